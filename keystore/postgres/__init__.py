"""The PostgreSQL keystore (asyncpg): its dialect (dialect.py), the pool and outage state
(db.py), migrations, LISTEN/NOTIFY (listen.py) and the copy from SQLite (copy.py). Only a
``postgresql://`` keystore loads it."""
