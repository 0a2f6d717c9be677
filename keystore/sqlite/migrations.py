"""Numbered schema migrations, tracked in ``PRAGMA user_version``.

MIGRATIONS[n] upgrades a database from version n to n + 1. Each migration runs in one
``BEGIN IMMEDIATE`` transaction together with the version bump, and the version is
re-read inside that transaction, so a CLI and the daemon opening a fresh file at the same
moment cannot both apply it. Never edit a released step: append a new one.

Timestamps are INTEGER microseconds since the Unix epoch, UTC: they sort and compare
numerically in queries and round-trip to aware datetimes exactly.
"""

from __future__ import annotations

import logging

import aiosqlite

from keystore.errors import KeybrokerError

log = logging.getLogger(__name__)

_V1 = [
    # Devices are looked up by id on every CONNECT: the id is the clustered key.
    """
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY,
        name        TEXT,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        connected   INTEGER NOT NULL DEFAULT 0,
        last_seen   INTEGER
    ) WITHOUT ROWID
    """,
    # Tags are a multi-map: one row per (device, key, value).
    """
    CREATE TABLE device_tags (
        device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (device_id, key, value)
    ) WITHOUT ROWID
    """,
    # Scope resolution finds devices by tag pair: a covering index, never a table scan.
    "CREATE INDEX device_tags_by_pair ON device_tags (key, value, device_id)",
    # Only a salt and HMAC of the secret are kept; list-valued fields that are never
    # searched by index (addresses, topic filters) are JSON arrays.
    """
    CREATE TABLE access_keys (
        key           TEXT PRIMARY KEY,
        salt          BLOB NOT NULL,
        secret_hash   BLOB NOT NULL,
        name          TEXT UNIQUE,
        description   TEXT,
        status        TEXT NOT NULL CHECK (status IN ('active', 'inactive')),
        expires_at    INTEGER,
        all_devices   INTEGER NOT NULL CHECK (all_devices IN (0, 1)),
        address_mode  TEXT NOT NULL CHECK (address_mode IN ('all', 'only', 'except')),
        addresses     TEXT NOT NULL DEFAULT '[]',
        topic_mode    TEXT NOT NULL CHECK (topic_mode IN ('none', 'all', 'only', 'except')),
        pub_topics    TEXT NOT NULL DEFAULT '[]',
        sub_topics    TEXT NOT NULL DEFAULT '[]',
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        last_used     INTEGER
    ) WITHOUT ROWID
    """,
    # The device restriction. Listed ids deliberately do not reference devices(id): the
    # restriction is immutable, so deleting a device must not rewrite keys; scope
    # resolution joins with devices to return only ids that exist now.
    """
    CREATE TABLE key_devices (
        key       TEXT NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        device_id TEXT NOT NULL,
        PRIMARY KEY (key, device_id)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE key_tags (
        key    TEXT NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        tkey   TEXT NOT NULL,
        tvalue TEXT NOT NULL,
        PRIMARY KEY (key, tkey, tvalue)
    ) WITHOUT ROWID
    """,
]

# A change feed for the daemon (docs/live-changes.md). Triggers write it, so every
# writer — the daemon, the CLI in another process, a future API — feeds it without
# knowing. AUTOINCREMENT keeps ids increasing after the daemon deletes applied rows
# (broker.services.prune): a reader's position stays valid.
NOW_MICROS = "CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"
_V2 = [
    """
    CREATE TABLE changes (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        kind    TEXT NOT NULL,
        subject TEXT NOT NULL,
        at      INTEGER NOT NULL
    )
    """,
    *(
        # Only our own constants are interpolated here (no user input reaches DDL).
        f"CREATE TRIGGER {name} AFTER {event} ON {table} {when} "  # noqa: S608
        f"BEGIN INSERT INTO changes (kind, subject, at) VALUES ('{kind}', {subject}, "
        f"{NOW_MICROS}); END"
        for name, event, table, when, kind, subject in (
            ("key_status_changed", "UPDATE OF status", "access_keys",
             "WHEN NEW.status IS NOT OLD.status", "key_status", "NEW.key"),
            ("key_expiry_changed", "UPDATE OF expires_at", "access_keys",
             "WHEN NEW.expires_at IS NOT OLD.expires_at", "key_expiry", "NEW.key"),
            ("key_deleted", "DELETE", "access_keys", "", "key_deleted", "OLD.key"),
            ("device_deleted", "DELETE", "devices", "", "device_deleted", "OLD.id"),
        )
    ),
]

# The auth generation: bumped whenever the set of devices or their tags changes, i.e.
# whenever a key's resolved scope could change. The daemon reads it with each CONNECT's key
# lookup and keeps resolved scopes and device facts in memory while it stays the same.
# Key rows are read fresh on every CONNECT, so key changes need no bump; status writes
# (connected, last_seen, last_used) are UPDATEs and do not bump it either.
_BUMP = "UPDATE meta SET value = value + 1 WHERE name = 'auth_generation'"
_V3 = [
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO meta (name, value) VALUES ('auth_generation', 0)",
    *(
        f"CREATE TRIGGER auth_gen_{table}_{event.lower()} AFTER {event} ON {table} "
        f"BEGIN {_BUMP}; END"
        for table in ("devices", "device_tags")
        for event in ("INSERT", "DELETE")
    ),
]

# A key's connection restriction or topic lists changed: live sessions get the new policy
# (same scope) and a session whose address is no longer allowed is disconnected.
_RESTRICTIONS = ("address_mode", "addresses", "topic_mode", "pub_topics", "sub_topics")
_V4 = [
    # Only our own constants are interpolated here (no user input reaches DDL).
    "CREATE TRIGGER key_restrictions_changed AFTER UPDATE OF "  # noqa: S608
    + ", ".join(_RESTRICTIONS) + " ON access_keys WHEN "
    + " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in _RESTRICTIONS)
    + " BEGIN INSERT INTO changes (kind, subject, at) VALUES ('key_updated', NEW.key, "
    + f"{NOW_MICROS}); END",
]

# Applications (tenants): every device and key belongs to one. An existing keystore moves
# into one application named "default" (a fresh one starts with it too). access_keys is
# rebuilt, because key names become unique per application instead of globally; its
# triggers go with the old table and are created again. Deleting an application writes
# an "app_deleted" change (its keys' and devices' own deletions write theirs).
_KEY_COLUMNS_V4 = ("key, salt, secret_hash, name, description, status, expires_at, "
                   "all_devices, address_mode, addresses, topic_mode, pub_topics, "
                   "sub_topics, created_at, updated_at, last_used")
_DEFAULT_APP = "(SELECT id FROM applications WHERE name = 'default')"


def _change_trigger(name: str, event: str, table: str, when: str, kind: str,
                    subject: str) -> str:
    # Only our own constants are interpolated here (no user input reaches DDL).
    return (f"CREATE TRIGGER {name} AFTER {event} ON {table} {when} "  # noqa: S608
            f"BEGIN INSERT INTO changes (kind, subject, at) VALUES ('{kind}', {subject}, "
            f"{NOW_MICROS}); END")


_V5 = [
    """
    CREATE TABLE applications (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        description TEXT,
        max_keys    INTEGER,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # max_keys NULL: the keystore's configured limit applies (what the old file had).
    "INSERT INTO applications (id, name, description, max_keys, created_at, updated_at) "  # noqa: S608
    "VALUES (lower(hex(randomblob(12))), 'default', "
    f"'every device and key of the keystore before applications', NULL, {NOW_MICROS}, "
    f"{NOW_MICROS})",
    "ALTER TABLE devices ADD COLUMN app_id TEXT NOT NULL DEFAULT '' "
    "REFERENCES applications(id)",
    f"UPDATE devices SET app_id = {_DEFAULT_APP}",  # noqa: S608
    "CREATE INDEX devices_by_app ON devices (app_id, id)",
    """
    CREATE TABLE access_keys_v5 (
        key           TEXT PRIMARY KEY,
        salt          BLOB NOT NULL,
        secret_hash   BLOB NOT NULL,
        name          TEXT,
        description   TEXT,
        status        TEXT NOT NULL CHECK (status IN ('active', 'inactive')),
        expires_at    INTEGER,
        all_devices   INTEGER NOT NULL CHECK (all_devices IN (0, 1)),
        address_mode  TEXT NOT NULL CHECK (address_mode IN ('all', 'only', 'except')),
        addresses     TEXT NOT NULL DEFAULT '[]',
        topic_mode    TEXT NOT NULL CHECK (topic_mode IN ('none', 'all', 'only', 'except')),
        pub_topics    TEXT NOT NULL DEFAULT '[]',
        sub_topics    TEXT NOT NULL DEFAULT '[]',
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        last_used     INTEGER,
        app_id        TEXT NOT NULL REFERENCES applications(id),
        UNIQUE (app_id, name)
    ) WITHOUT ROWID
    """,
    f"INSERT INTO access_keys_v5 ({_KEY_COLUMNS_V4}, app_id) "  # noqa: S608
    f"SELECT {_KEY_COLUMNS_V4}, {_DEFAULT_APP} FROM access_keys",
    "DROP TABLE access_keys",
    "ALTER TABLE access_keys_v5 RENAME TO access_keys",
    "CREATE INDEX keys_by_app ON access_keys (app_id, created_at, key)",
    _change_trigger("key_status_changed", "UPDATE OF status", "access_keys",
                    "WHEN NEW.status IS NOT OLD.status", "key_status", "NEW.key"),
    _change_trigger("key_expiry_changed", "UPDATE OF expires_at", "access_keys",
                    "WHEN NEW.expires_at IS NOT OLD.expires_at", "key_expiry", "NEW.key"),
    _change_trigger("key_deleted", "DELETE", "access_keys", "", "key_deleted", "OLD.key"),
    _change_trigger("key_restrictions_changed", "UPDATE OF " + ", ".join(_RESTRICTIONS),
                    "access_keys",
                    "WHEN " + " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in _RESTRICTIONS),
                    "key_updated", "NEW.key"),
    _change_trigger("app_deleted", "DELETE", "applications", "", "app_deleted", "OLD.id"),
]

# The HTTP API (docs/api.md). Keys get an ``id`` (24 hex, like Losant's applicationKeyId)
# next to their public ``key``; existing keys are given one. Admin tokens and device
# tokens are stored like secrets: an id to find the row, a salt and HMAC of the secret
# part (keystore.credentials), never the token itself. A device token goes with its key
# and its device (ON DELETE CASCADE) and expires. Admin tokens are revoked, not deleted, so
# the list keeps what existed; a token of one application goes with that application.
_V6 = [
    "ALTER TABLE access_keys ADD COLUMN id TEXT NOT NULL DEFAULT ''",
    "UPDATE access_keys SET id = lower(hex(randomblob(12)))",
    "CREATE UNIQUE INDEX keys_by_id ON access_keys (id)",
    """
    CREATE TABLE api_tokens (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        app_id      TEXT REFERENCES applications(id) ON DELETE CASCADE,
        scopes      TEXT NOT NULL,
        salt        BLOB NOT NULL,
        secret_hash BLOB NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER,
        last_used   INTEGER
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE device_tokens (
        id          TEXT PRIMARY KEY,
        key         TEXT NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        salt        BLOB NOT NULL,
        secret_hash BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX device_tokens_by_owner ON device_tokens (key, device_id, created_at)",
    "CREATE INDEX device_tokens_by_expiry ON device_tokens (expires_at)",
    "CREATE INDEX device_tokens_by_device ON device_tokens (device_id)",
]

# Tag resolution without a probe per device: a tag row carries its device's application
# (which never changes), so the devices of an application carrying a tag pair are one
# range of one covering index, however many devices other applications hold.
_V7 = [
    "ALTER TABLE device_tags ADD COLUMN app_id TEXT NOT NULL DEFAULT ''",
    "UPDATE device_tags SET app_id = (SELECT app_id FROM devices WHERE id = device_id)",
    "DROP INDEX device_tags_by_pair",
    "CREATE INDEX device_tags_by_app_pair ON device_tags (app_id, key, value, device_id)",
]

# Connection snapshots for external MQTT engines (keybroker authsvc, docs/cluster.md): what
# a connection was granted at CONNECT, written by the replica that admitted it and read by
# whichever replica answers the connection's later requests. One row per client id (an
# engine holds one connection per client id, and the client id is a device id); it goes
# with its key and with its device. A scope is stored once per distinct device list, by
# digest, so a CONNECT writes a short row and a request reads one; scopes no connection
# refers to are deleted after a day (broker.services.prune). Keys are also found by expiry, so the
# service can disconnect the connections of a key the moment it expires.
_V8 = [
    """
    CREATE TABLE scope_snapshots (
        digest     TEXT PRIMARY KEY,
        devices    TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE connection_snapshots (
        client_id  TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        key        TEXT NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        scope      TEXT REFERENCES scope_snapshots(digest),
        policy     TEXT NOT NULL,
        client_ip  TEXT NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX connection_snapshots_by_key ON connection_snapshots (key)",
    "CREATE INDEX connection_snapshots_by_scope ON connection_snapshots (scope)",
    "CREATE INDEX keys_by_expiry ON access_keys (expires_at) WHERE expires_at IS NOT NULL",
]

# Credential checks for keybroker authsvc: RabbitMQ checks a CONNECT's secret in one request
# (/auth/user) and admits it in another (/auth/vhost), which carries no secret and may
# reach another replica. The first records here that the key's secret was checked for the
# client id; the second admits only a client id with a recent record of the same key. One
# row per client id that is a device, so the table is as large as the device list at most.
_V9 = [
    """
    CREATE TABLE credential_checks (
        client_id  TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        key        TEXT NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        checked_at INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    "CREATE INDEX credential_checks_by_key ON credential_checks (key)",
]

# An application's device limit, beside its key limit: NULL (every application made
# before, and "default") follows the configured [keystore] max_devices.
_V10 = [
    "ALTER TABLE applications ADD COLUMN max_devices INTEGER",
]

MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10]
SCHEMA_VERSION = len(MIGRATIONS)
# Steps that rebuild a table others reference: foreign keys are off while they run (a
# PRAGMA that only works outside a transaction), and checked before they commit.
REBUILDS = frozenset({4})


async def user_version(conn: aiosqlite.Connection) -> int:
    async with conn.execute("PRAGMA user_version") as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _next_step(conn: aiosqlite.Connection, version: int) -> tuple[list[str], int]:
    """The statements that lead on from ``version``, and the version they reach. A keystore
    made by keybroker authsvc before the PostgreSQL backend came in numbered its connection
    snapshots 7 (now step 8): at that 7 it lacks only today's step 7, then it is at 8."""
    if version == 7:
        async with conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' "
                                "AND name = 'connection_snapshots'") as cursor:
            if await cursor.fetchone() is not None:
                return _V7, 8
    return MIGRATIONS[version], version + 1


async def migrate(conn: aiosqlite.Connection, path: str) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the final version.

    Expects an autocommit connection (isolation_level=None).
    """
    while True:
        await conn.execute("BEGIN IMMEDIATE")
        rebuild = False
        try:
            version = await user_version(conn)
            if version in REBUILDS and version < SCHEMA_VERSION:
                await conn.execute("ROLLBACK")
                await conn.execute("PRAGMA foreign_keys = OFF")
                rebuild = True
                await conn.execute("BEGIN IMMEDIATE")
                version = await user_version(conn)  # another process may have moved on
            if version > SCHEMA_VERSION:
                raise KeybrokerError(
                    f"keystore {path!r} has schema version {version}, newer than this "
                    f"keybroker supports ({SCHEMA_VERSION}); upgrade keybroker"
                )
            if version == SCHEMA_VERSION:
                await conn.execute("COMMIT")
                return version
            statements, reached = await _next_step(conn, version)
            for statement in statements:
                await conn.execute(statement)
            if rebuild:
                async with conn.execute("PRAGMA foreign_key_check") as cursor:
                    broken = list(await cursor.fetchall())
                if broken:
                    raise KeybrokerError(
                        f"keystore {path!r}: migration to schema version {reached} "
                        f"left foreign keys broken ({broken[0]}); nothing was changed")
            # PRAGMA cannot take parameters; the value is our own integer.
            await conn.execute(f"PRAGMA user_version = {reached}")
            await conn.execute("COMMIT")
            log.info("keystore %s migrated to schema version %d", path, reached)
        except BaseException:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
        finally:
            if rebuild:
                await conn.execute("PRAGMA foreign_keys = ON")
