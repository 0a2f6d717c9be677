"""The PostgreSQL keystore backend (asyncpg): keystore.postgres.backend."""
