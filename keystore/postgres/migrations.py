"""Numbered schema migrations for PostgreSQL, the same versions as SQLite's
(keystore.sqlite.migrations): step n leads to the same tables, columns, stored forms and
change-feed rules as SQLite's step n, written the PostgreSQL way.

The version is kept in ``keybroker_schema``. Each step runs in one transaction with the
version bump, under a transaction-scoped advisory lock, so processes opening a fresh
database at the same moment apply each step once. Never edit a released step: append.

PostgreSQL specifics:
* text columns use the "C" collation: comparisons and ORDER BY go by code point, as in
  SQLite (and btree lookups skip locale rules);
* JSON lists are ``jsonb`` (the same JSON text on the way in and out);
* change-feed rows are written by one function, ``keybroker_add_change``, which also
  sends ``NOTIFY keybroker_changes`` (delivered at commit) and holds the feed lock
  until commit, so change ids become visible in id order: a reader that has seen id n
  has seen every committed id below it;
* the auth generation moves once per statement that inserted or deleted devices or
  tags (statement triggers with transition tables), not once per row.
"""

# Only our own constants are interpolated into these statements (no input reaches DDL).
# ruff: noqa: S608

from __future__ import annotations

import logging

import asyncpg

from keystore.errors import KeybrokerError

log = logging.getLogger(__name__)

MIGRATION_TIMEOUT = 24 * 3600.0  # seconds; a step rewrites whole tables, let it finish
MIGRATE_LOCK = 0x6B62_0001  # advisory lock ids: "kb" + a number
FEED_LOCK = 0x6B62_0002
CHANNEL = "keybroker_changes"
_NOW_MICROS = "(extract(epoch from clock_timestamp()) * 1000000)::bigint"
_NEW_ID = "substr(md5(random()::text || clock_timestamp()::text), 1, 24)"

_V1 = [
    """
    CREATE TABLE devices (
        id          TEXT COLLATE "C" PRIMARY KEY,
        name        TEXT COLLATE "C",
        created_at  BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL,
        connected   SMALLINT NOT NULL DEFAULT 0,
        last_seen   BIGINT
    )
    """,
    """
    CREATE TABLE device_tags (
        device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        key       TEXT COLLATE "C" NOT NULL,
        value     TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (device_id, key, value)
    )
    """,
    # Scope resolution finds devices by tag pair: index-only, never a table scan.
    "CREATE INDEX device_tags_by_pair ON device_tags (key, value, device_id)",
    """
    CREATE TABLE access_keys (
        key           TEXT COLLATE "C" PRIMARY KEY,
        salt          BYTEA NOT NULL,
        secret_hash   BYTEA NOT NULL,
        name          TEXT COLLATE "C" UNIQUE,
        description   TEXT COLLATE "C",
        status        TEXT COLLATE "C" NOT NULL CHECK (status IN ('active', 'inactive')),
        expires_at    BIGINT,
        all_devices   SMALLINT NOT NULL CHECK (all_devices IN (0, 1)),
        address_mode  TEXT COLLATE "C" NOT NULL
                      CHECK (address_mode IN ('all', 'only', 'except')),
        addresses     JSONB NOT NULL DEFAULT '[]',
        topic_mode    TEXT COLLATE "C" NOT NULL
                      CHECK (topic_mode IN ('none', 'all', 'only', 'except')),
        pub_topics    JSONB NOT NULL DEFAULT '[]',
        sub_topics    JSONB NOT NULL DEFAULT '[]',
        created_at    BIGINT NOT NULL,
        updated_at    BIGINT NOT NULL,
        last_used     BIGINT
    )
    """,
    # Listed ids deliberately do not reference devices(id) (see the SQLite step).
    """
    CREATE TABLE key_devices (
        key       TEXT COLLATE "C" NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        device_id TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (key, device_id)
    )
    """,
    """
    CREATE TABLE key_tags (
        key    TEXT COLLATE "C" NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        tkey   TEXT COLLATE "C" NOT NULL,
        tvalue TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (key, tkey, tvalue)
    )
    """,
]


def _change_trigger(name: str, event: str, table: str, when: str, kind: str,
                    column: str) -> str:
    condition = f"WHEN ({when}) " if when else ""
    return (f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW {condition}"
            f"EXECUTE FUNCTION keybroker_record_change('{kind}', '{column}')")


_V2 = [
    # BIGSERIAL ids keep increasing after the daemon deletes applied rows (broker.services.prune).
    """
    CREATE TABLE changes (
        id      BIGSERIAL PRIMARY KEY,
        kind    TEXT COLLATE "C" NOT NULL,
        subject TEXT COLLATE "C" NOT NULL,
        at      BIGINT NOT NULL
    )
    """,
    f"""
    CREATE FUNCTION keybroker_add_change(change_kind TEXT, change_subject TEXT)
    RETURNS void LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({FEED_LOCK});
        INSERT INTO changes (kind, subject, at)
        VALUES (change_kind, change_subject, {_NOW_MICROS});
        PERFORM pg_notify('{CHANNEL}', '');
    END $$
    """,
    # TG_ARGV: the change kind, and the column naming its subject.
    """
    CREATE FUNCTION keybroker_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM keybroker_add_change(TG_ARGV[0], to_jsonb(OLD) ->> TG_ARGV[1]);
        ELSE
            PERFORM keybroker_add_change(TG_ARGV[0], to_jsonb(NEW) ->> TG_ARGV[1]);
        END IF;
        RETURN NULL;
    END $$
    """,
    _change_trigger("key_status_changed", "UPDATE OF status", "access_keys",
                    "NEW.status IS DISTINCT FROM OLD.status", "key_status", "key"),
    _change_trigger("key_expiry_changed", "UPDATE OF expires_at", "access_keys",
                    "NEW.expires_at IS DISTINCT FROM OLD.expires_at", "key_expiry", "key"),
    _change_trigger("key_deleted", "DELETE", "access_keys", "", "key_deleted", "key"),
    _change_trigger("device_deleted", "DELETE", "devices", "", "device_deleted", "id"),
]

_V3 = [
    "CREATE TABLE meta (name TEXT COLLATE \"C\" PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO meta (name, value) VALUES ('auth_generation', 0)",
    """
    CREATE FUNCTION keybroker_bump_generation() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF EXISTS (SELECT 1 FROM moved) THEN
            UPDATE meta SET value = value + 1 WHERE name = 'auth_generation';
        END IF;
        RETURN NULL;
    END $$
    """,
    *(
        f"CREATE TRIGGER auth_gen_{table}_{event.lower()} AFTER {event} ON {table} "
        f"REFERENCING {'NEW' if event == 'INSERT' else 'OLD'} TABLE AS moved "
        "FOR EACH STATEMENT EXECUTE FUNCTION keybroker_bump_generation()"
        for table in ("devices", "device_tags")
        for event in ("INSERT", "DELETE")
    ),
]

_RESTRICTIONS = ("address_mode", "addresses", "topic_mode", "pub_topics", "sub_topics")
_V4 = [
    _change_trigger("key_restrictions_changed", "UPDATE OF " + ", ".join(_RESTRICTIONS),
                    "access_keys",
                    " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in _RESTRICTIONS),
                    "key_updated", "key"),
]

_DEFAULT_APP = "(SELECT id FROM applications WHERE name = 'default')"
_V5 = [
    """
    CREATE TABLE applications (
        id          TEXT COLLATE "C" PRIMARY KEY,
        name        TEXT COLLATE "C" NOT NULL UNIQUE,
        description TEXT COLLATE "C",
        max_keys    INTEGER,
        created_at  BIGINT NOT NULL,
        updated_at  BIGINT NOT NULL
    )
    """,
    "INSERT INTO applications (id, name, description, max_keys, created_at, updated_at) "
    f"VALUES ({_NEW_ID}, 'default', "
    f"'every device and key of the keystore before applications', NULL, {_NOW_MICROS}, "
    f"{_NOW_MICROS})",
    'ALTER TABLE devices ADD COLUMN app_id TEXT COLLATE "C" REFERENCES applications(id)',
    f"UPDATE devices SET app_id = {_DEFAULT_APP}",
    "ALTER TABLE devices ALTER COLUMN app_id SET NOT NULL",
    "CREATE INDEX devices_by_app ON devices (app_id, id)",
    # A device's application by its id, index-only: CONNECT's device check and the
    # scope join read it for every device they touch.
    "CREATE UNIQUE INDEX devices_app_of ON devices (id) INCLUDE (app_id)",
    'ALTER TABLE access_keys ADD COLUMN app_id TEXT COLLATE "C" REFERENCES applications(id)',
    f"UPDATE access_keys SET app_id = {_DEFAULT_APP}",
    "ALTER TABLE access_keys ALTER COLUMN app_id SET NOT NULL",
    # Key names become unique per application instead of globally.
    "ALTER TABLE access_keys DROP CONSTRAINT access_keys_name_key",
    "ALTER TABLE access_keys ADD CONSTRAINT access_keys_app_name UNIQUE (app_id, name)",
    "CREATE INDEX keys_by_app ON access_keys (app_id, created_at, key)",
    _change_trigger("app_deleted", "DELETE", "applications", "", "app_deleted", "id"),
]

_V6 = [
    'ALTER TABLE access_keys ADD COLUMN id TEXT COLLATE "C"',
    f"UPDATE access_keys SET id = {_NEW_ID}",
    "ALTER TABLE access_keys ALTER COLUMN id SET NOT NULL",
    "CREATE UNIQUE INDEX keys_by_id ON access_keys (id)",
    """
    CREATE TABLE api_tokens (
        id          TEXT COLLATE "C" PRIMARY KEY,
        name        TEXT COLLATE "C" NOT NULL UNIQUE,
        app_id      TEXT COLLATE "C" REFERENCES applications(id) ON DELETE CASCADE,
        scopes      JSONB NOT NULL,
        salt        BYTEA NOT NULL,
        secret_hash BYTEA NOT NULL,
        status      TEXT COLLATE "C" NOT NULL CHECK (status IN ('active', 'revoked')),
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT,
        last_used   BIGINT
    )
    """,
    """
    CREATE TABLE device_tokens (
        id          TEXT COLLATE "C" PRIMARY KEY,
        key         TEXT COLLATE "C" NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        device_id   TEXT COLLATE "C" NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        salt        BYTEA NOT NULL,
        secret_hash BYTEA NOT NULL,
        created_at  BIGINT NOT NULL,
        expires_at  BIGINT NOT NULL
    )
    """,
    "CREATE INDEX device_tokens_by_owner ON device_tokens (key, device_id, created_at)",
    "CREATE INDEX device_tokens_by_expiry ON device_tokens (expires_at)",
    "CREATE INDEX device_tokens_by_device ON device_tokens (device_id)",
]

# Tag rows carry their device's application (see the SQLite step): scope resolution reads
# one range of one covering index instead of probing devices once per device.
_V7 = [
    'ALTER TABLE device_tags ADD COLUMN app_id TEXT COLLATE "C"',
    "UPDATE device_tags t SET app_id = d.app_id FROM devices d WHERE d.id = t.device_id",
    "ALTER TABLE device_tags ALTER COLUMN app_id SET NOT NULL",
    "DROP INDEX device_tags_by_pair",
    "CREATE INDEX device_tags_by_app_pair ON device_tags (app_id, key, value, device_id)",
]

# Connection snapshots for external MQTT engines (see the SQLite step): one row per client
# id with its grant, scope lists stored once by digest (the device ids as a JSON array,
# like every list that is never searched by index), keys found by expiry.
_V8 = [
    """
    CREATE TABLE scope_snapshots (
        digest     TEXT COLLATE "C" PRIMARY KEY,
        devices    JSONB NOT NULL,
        created_at BIGINT NOT NULL
    )
    """,
    """
    CREATE TABLE connection_snapshots (
        client_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        key        TEXT COLLATE "C" NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        scope      TEXT COLLATE "C" REFERENCES scope_snapshots(digest),
        policy     TEXT COLLATE "C" NOT NULL,
        client_ip  TEXT COLLATE "C" NOT NULL,
        created_at BIGINT NOT NULL
    )
    """,
    "CREATE INDEX connection_snapshots_by_key ON connection_snapshots (key)",
    "CREATE INDEX connection_snapshots_by_scope ON connection_snapshots (scope)",
    "CREATE INDEX keys_by_expiry ON access_keys (expires_at) WHERE expires_at IS NOT NULL",
]

# Credential checks for keybroker authsvc (see the SQLite step): a recent successful
# /auth/user of a client id and key, which /auth/vhost requires.
_V9 = [
    """
    CREATE TABLE credential_checks (
        client_id  TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        key        TEXT COLLATE "C" NOT NULL REFERENCES access_keys(key) ON DELETE CASCADE,
        checked_at BIGINT NOT NULL
    )
    """,
    "CREATE INDEX credential_checks_by_key ON credential_checks (key)",
]

# An application's device limit (see the SQLite step).
_V10 = [
    "ALTER TABLE applications ADD COLUMN max_devices INTEGER",
]

MIGRATIONS: list[list[str]] = [_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8, _V9, _V10]
SCHEMA_VERSION = len(MIGRATIONS)


async def schema_version(conn: asyncpg.Connection) -> int:
    """The database's schema version; 0 for a database keybroker never used."""
    exists = await conn.fetchval("SELECT to_regclass('keybroker_schema') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT version FROM keybroker_schema"))


async def migrate(conn: asyncpg.Connection, location: str) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the final version."""
    while True:
        async with conn.transaction():
            # A step may rewrite a million rows: not under the pool's statement timeout.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATE_LOCK})",
                               timeout=MIGRATION_TIMEOUT)
            version = await schema_version(conn)
            if version > SCHEMA_VERSION:
                raise KeybrokerError(
                    f"keystore {location} has schema version {version}, newer than this "
                    f"keybroker supports ({SCHEMA_VERSION}); upgrade keybroker")
            if version == SCHEMA_VERSION:
                return version
            if version == 0:
                await conn.execute("CREATE TABLE keybroker_schema (version INTEGER NOT NULL)")
                await conn.execute("INSERT INTO keybroker_schema (version) VALUES (0)")
            for statement in MIGRATIONS[version]:
                await conn.execute(statement, timeout=MIGRATION_TIMEOUT)
            await conn.execute("UPDATE keybroker_schema SET version = $1", version + 1)
        log.info("keystore %s migrated to schema version %d", location, version + 1)
