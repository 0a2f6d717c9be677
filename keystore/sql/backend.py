"""SqlBackend: the keystore's one Backend (keystore.backend), every operation written once
over a dialect (keystore.sql.dialect): an SQLite file or a PostgreSQL database."""

from __future__ import annotations

from keystore.sql.apps import SqlApps
from keystore.sql.connections import SqlConnections
from keystore.sql.devices import SqlDevices
from keystore.sql.feed import SqlFeed
from keystore.sql.keys import SqlKeys
from keystore.sql.tokens import SqlTokens


class SqlBackend(SqlApps, SqlDevices, SqlKeys, SqlTokens, SqlConnections, SqlFeed):
    """One transaction per call; the checks that need the database (names taken, limits,
    device ids of the application) run inside it, so they stay true until it commits."""
