"""The keystore's statements whose text needs a dialect's fragments (keystore.sql.dialect
``Spelling``), each written once and rendered once per dialect. Every other statement is
the same text on both databases and is written where it runs (keystore.sql).

Column order is the contract of keystore.rows: ``row_to_key`` reads ``key_columns`` and
``row_to_device`` reads ``device_columns``, whichever database returned them.
"""

# SQL text here is assembled only from constants and a dialect's fragments; every value
# is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from keystore import lookup
from keystore.rows import APP_COLUMNS, SNAPSHOT_COLUMNS, TOKEN_COLUMNS
from keystore.sql.dialect import Spelling

# Looking things up by what an operator types for them (keystore.lookup).
APP_LOOKUP_SQL = lookup.APPLICATION.sql(APP_COLUMNS)
KEY_LOOKUP_SQL = lookup.ACCESS_KEY.sql("k.key")
TOKEN_LOOKUP_SQL = lookup.API_TOKEN.sql(TOKEN_COLUMNS)


@dataclass(frozen=True, slots=True)
class Statements:
    key_columns: str
    device_columns: str
    connect: str  # $1 the key
    scope: str  # $1 the key, $2 its application
    device_token: str  # $1 the token id
    connection: str  # $1 the client id


@cache
def render(s: Spelling) -> Statements:
    """The statements as the database of ``s`` runs them."""
    # A key's restriction lists come back in its row, so reading a key is one statement.
    key_columns = f"""
        k.key, k.name, k.description, k.status, k.expires_at, k.all_devices,
        k.address_mode, k.addresses, k.topic_mode, k.pub_topics, k.sub_topics,
        k.created_at, k.updated_at, k.last_used,
        {s.array("device_id", "FROM key_devices WHERE key = k.key")},
        {s.array(s.pair("tkey", "tvalue"), "FROM key_tags WHERE key = k.key")},
        k.app_id, k.id"""
    device_columns = f"""
        d.id, d.name, d.created_at, d.updated_at, d.connected, d.last_seen,
        {s.array(s.pair("key", "value"), "FROM device_tags WHERE device_id = d.id")},
        d.app_id"""
    # The devices of the key's application listed by id, then those carrying a listed tag
    # pair. Both halves walk primary keys and the (app_id, key, value, device_id) covering
    # index: one index range per listed pair, no lookup per device. The join goes from
    # the key's few rows to devices, never over an application's devices; UNION ALL: the
    # caller builds a frozenset anyway.
    scope = f"""
        SELECT d.id FROM key_devices kd {s.ordered_join} devices d ON d.id = kd.device_id
         WHERE kd.key = $1 AND d.app_id = $2
        UNION ALL
        SELECT dt.device_id FROM key_tags kt
          {s.ordered_join} device_tags dt ON dt.key = kt.tkey AND dt.value = kt.tvalue
         WHERE kt.key = $1 AND dt.app_id = $2"""
    # One round trip for CONNECT: the auth generation, the key (none: an unknown key), its
    # salt and hash, and, for a key that lists device ids and no tags, its whole scope.
    connect = (
        f"SELECT g.value, {key_columns}, k.salt, k.secret_hash, "
        "CASE WHEN k.all_devices = 0 AND NOT EXISTS (SELECT 1 FROM key_tags WHERE key = k.key) "
        "THEN " + s.array("d.id", f"FROM key_devices kd {s.ordered_join} devices d "
                          "ON d.id = kd.device_id WHERE kd.key = k.key AND d.app_id = k.app_id")
        + " END FROM meta g LEFT JOIN access_keys k ON k.key = $1 "
        "WHERE g.name = 'auth_generation'")
    device_token = (
        "SELECT (SELECT value FROM meta WHERE name = 'auth_generation'), t.device_id, t.salt, "
        f"t.secret_hash, t.expires_at, {key_columns} "
        "FROM device_tokens t JOIN access_keys k ON k.key = t.key WHERE t.id = $1")
    # One primary-key read per request of an engine's connection: the snapshot, its
    # device's application and its key as it is now.
    connection = (
        f"SELECT {SNAPSHOT_COLUMNS}, (SELECT app_id FROM devices WHERE id = s.client_id), "
        f"{key_columns} FROM connection_snapshots s JOIN access_keys k ON k.key = s.key "
        "WHERE s.client_id = $1")
    return Statements(key_columns, device_columns, connect, scope, device_token, connection)
