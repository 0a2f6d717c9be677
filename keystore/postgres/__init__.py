"""The PostgreSQL keystore backend (asyncpg): keystore.postgres.backend.

This package's own module imports nothing, so settings and the SQLite path can name these
defaults without loading asyncpg."""

DEFAULT_POOL_SIZE = 10
DEFAULT_STATEMENT_TIMEOUT = 5.0  # seconds
