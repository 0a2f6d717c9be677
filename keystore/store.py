"""KeyStore: the async API over one SQLite file holding devices and access keys.

Every public operation is one transaction and validates its whole input first, so a
refused call writes nothing. An asyncio.Lock serialises operations on the single
connection: without it, one coroutine's statements could run inside another's open
transaction.
"""

# SQL text in this module is assembled only from constants, whitelisted names and
# '?' placeholder counts; every value is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from enum import Enum
from types import TracebackType
from typing import Any, Literal, Self

import aiosqlite

from broker.topics import validate_device_prefix
from keystore import credentials, statements
from keystore.connect import ConnectLookup, ConnectResolver
from keystore.db import (
    DEVICE_COLUMNS,
    KEY_COLUMNS,
    chunks,
    connect,
    from_micros,
    now_micros,
    placeholders,
    row_to_device,
    row_to_key,
    to_micros,
)
from keystore.errors import ConflictError, LimitError, NotFoundError, ValidationError
from keystore.keyspec import (
    KeySpec,
    check_modes,
    validate_addresses,
    validate_key_spec,
    validate_topic_list,
)
from keystore.migrations import migrate
from keystore.models import AccessKey, AddressMode, Change, Device, KeyStatus, Tag, TopicMode
from keystore.query import compile_query
from keystore.statements import DEVICE_MATCH_SQL, MIN_PREFIX_LEN, SCOPE_SQL
from keystore.validation import (
    coerce_address_mode,
    coerce_status,
    coerce_topic_mode,
    coerce_utc,
    dedupe,
    parse_tag,
    validate_description,
    validate_device_id,
    validate_key_name,
    validate_tags,
)

log = logging.getLogger(__name__)



class _Unset(Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset.UNSET
"""update_key default meaning 'leave this field alone' (None clears a field)."""
Unset = Literal[_Unset.UNSET]


def short(key: str) -> str:
    """How a key is named in messages and logs: its first 8 characters."""
    return key[:MIN_PREFIX_LEN]


class _Opener:
    """Result of KeyStore.open: use ``async with`` (closes on exit) or ``await`` it
    (then call ``await ks.close()``)."""

    def __init__(self, path: str, device_prefix: str, max_keys: int) -> None:
        self._args = (path, device_prefix, max_keys)
        self._store: KeyStore | None = None

    async def _open(self) -> KeyStore:
        path, device_prefix, max_keys = self._args
        if not isinstance(max_keys, int) or max_keys < 0:
            raise ValidationError(f"invalid max_keys {max_keys!r}: must be 0 (no limit) or more")
        validate_device_prefix(device_prefix)
        conn = await connect(path)
        try:
            await migrate(conn, path)
        except BaseException:
            await conn.close()
            raise
        store = KeyStore(conn, device_prefix=device_prefix, max_keys=max_keys)
        store.path = path
        return store

    def __await__(self) -> Generator[Any, None, KeyStore]:
        return self._open().__await__()

    async def __aenter__(self) -> KeyStore:
        self._store = await self._open()
        return self._store

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._store is not None:
            await self._store.close()


class KeyStore:
    def __init__(self, conn: aiosqlite.Connection, *, device_prefix: str, max_keys: int) -> None:
        self._conn = conn
        self.device_prefix = device_prefix
        self.max_keys = max_keys
        self._lock = asyncio.Lock()
        self._closed = False
        # Commits on our own connection do not move PRAGMA data_version; count them.
        self._local_commits = 0
        self._connect: ConnectResolver | None = None
        self.path: str | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, device_prefix: str = "losant", max_keys: int = 0
    ) -> _Opener:
        """Open (creating and migrating if needed) the keystore file at `path`."""
        return _Opener(os.fspath(path), device_prefix, max_keys)

    async def close(self) -> None:
        if self._connect is not None:
            self._connect.close()
        async with self._lock:
            if not self._closed:
                self._closed = True
                await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- transaction plumbing ---------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front (waiting up to
        busy_timeout for another process) so checks done inside it stay true."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
            self._local_commits += 1

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        """A consistent snapshot for reads of more than one statement."""
        async with self._lock:
            await self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                if self._conn.in_transaction:
                    await self._conn.execute("COMMIT")

    async def _fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def data_version(self) -> int:
        """Changes whenever another connection (e.g. the CLI) commits to the file; a
        cheap poll for the daemon to notice outside changes."""
        rows = await self._fetchall("PRAGMA data_version")
        return int(rows[0][0])

    async def connect_lookup(self, key: str, secret: str, device_id: str) -> ConnectLookup:
        """Key + secret + device facts + scope for one CONNECT (cached; see keystore.connect)."""
        if self._connect is None:
            self._connect = ConnectResolver(self)
        if not isinstance(key, str) or not isinstance(secret, str):
            credentials.verify_secret("", None, None)
            return ConnectLookup(None, False, False, None)
        return await self._connect.lookup(key, secret, device_id)

    async def change_marker(self) -> tuple[int, int]:
        """Moves whenever anyone (this connection or another process) commits a change."""
        return (await self.data_version(), self._local_commits)

    async def latest_change_id(self) -> int:
        rows = await self._fetchall("SELECT COALESCE(MAX(id), 0) FROM changes")
        return int(rows[0][0])

    async def changes_since(self, change_id: int, limit: int = 10_000) -> list[Change]:
        """Change-feed rows after ``change_id``, oldest first (see migrations._V2)."""
        rows = await self._fetchall(
            "SELECT id, kind, subject, at FROM changes WHERE id > ? ORDER BY id LIMIT ?",
            (change_id, limit),
        )
        return [Change(int(r[0]), str(r[1]), str(r[2]), from_micros(r[3])) for r in rows]

    async def request_kick(self, device_id: str) -> None:
        """Ask a running daemon to disconnect the session of ``device_id`` (operators)."""
        device_id = validate_device_id(device_id)
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO changes (kind, subject, at) VALUES ('kick', ?, ?)",
                (device_id, now_micros()),
            )

    async def prune_changes(
        self, before: datetime, *, up_to: int | None = None, batch: int = 10_000
    ) -> int:
        """Delete the oldest change rows written before ``before`` (and with an id of at
        most ``up_to``, the last one every reader has applied): at most ``batch`` of them,
        in one short transaction. Returns how many; 0 means nothing (more) to prune.

        The work is a rowid range from the oldest row, so a backlog of any size never
        holds the write lock for long: callers loop, yielding between batches
        (broker.prune). Ids keep increasing afterwards (AUTOINCREMENT)."""
        if batch < 1:
            raise ValidationError(f"invalid prune batch {batch!r}: must be 1 or more")
        async with self._write() as conn:
            async with conn.execute("SELECT MIN(id) FROM changes") as cursor:
                row = await cursor.fetchone()
            oldest = row[0] if row else None
            if oldest is None:
                return 0
            last = oldest + batch - 1 if up_to is None else min(oldest + batch - 1, up_to)
            cursor = await conn.execute(
                "DELETE FROM changes WHERE id BETWEEN ? AND ? AND at < ?",
                (oldest, last, to_micros(before)),
            )
            return max(cursor.rowcount, 0)

    # --- devices --------------------------------------------------------------------------

    async def add_device(
        self, device_id: str, *, name: str | None = None, tags: Iterable[Tag | str] = ()
    ) -> Device:
        device_id = validate_device_id(device_id)
        name = validate_key_name(name, "device name")
        pairs = validate_tags(tags)
        now = now_micros()
        async with self._write() as conn:
            if await statements.device_exists(conn, device_id):
                raise ConflictError(f"device {device_id!r} already exists")
            await conn.execute(
                "INSERT INTO devices (id, name, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (device_id, name, now, now),
            )
            await conn.executemany(
                "INSERT INTO device_tags (device_id, key, value) VALUES (?, ?, ?)",
                [(device_id, k, v) for k, v in pairs],
            )
            return await statements.load_device(conn, device_id)

    async def upsert_devices(
        self, items: Iterable[tuple[str, str | None, Iterable[Tag | str]]]
    ) -> int:
        """Insert new devices and bring existing ones to the given name and tag set.
        Idempotent: re-running the same seed changes nothing. Returns how many devices
        were created or changed."""
        wanted: dict[str, tuple[str | None, frozenset[Tag]]] = {}
        for item in items:
            try:
                device_id, name, tags = item
            except (TypeError, ValueError):
                raise ValidationError(
                    f"invalid device entry {item!r}: expected (id, name, tags)"
                ) from None
            device_id = validate_device_id(device_id)
            if device_id in wanted:
                raise ValidationError(f"device {device_id!r} appears more than once")
            wanted[device_id] = (
                validate_key_name(name, "device name"),
                frozenset(validate_tags(tags)),
            )
        now = now_micros()
        touched = 0
        async with self._write() as conn:
            for batch in chunks(list(wanted), 20_000):
                touched += await statements.upsert_batch(conn, batch, wanted, now)
        log.info("upserted %d devices (%d created or changed)", len(wanted), touched)
        return touched

    async def get_device(self, device_id: str) -> Device:
        async with self._lock:
            return await statements.load_device(self._conn, device_id)

    async def list_devices(self) -> list[Device]:
        rows = await self._fetchall(f"SELECT {DEVICE_COLUMNS} FROM devices d ORDER BY d.id")
        return [row_to_device(r) for r in rows]

    async def tag_device(self, device_id: str, tags: Iterable[Tag | str]) -> Device:
        pairs = validate_tags(tags)
        async with self._write() as conn:
            before = await statements.load_device(conn, device_id)
            added = [p for p in pairs if p not in before.tags]
            if added:
                await conn.executemany(
                    "INSERT INTO device_tags (device_id, key, value) VALUES (?, ?, ?)",
                    [(before.id, k, v) for k, v in added],
                )
                await statements.touch_device(conn, before.id)
            return await statements.load_device(conn, before.id)

    async def untag_device(self, device_id: str, specs: Iterable[str]) -> Device:
        """'k=v' removes that pair, 'k' every value of k. A spec matching none of the
        device's tags is an error and nothing is removed."""
        parsed: list[tuple[str, str | None, str]] = []
        for spec in dedupe(_as_str_list(specs, "tag specs")):
            if "=" in spec:
                k, v = parse_tag(spec)
                parsed.append((k, v, spec))
            else:
                k, _ = parse_tag(f"{spec}=x")  # validate the key alone
                parsed.append((k, None, spec))
        async with self._write() as conn:
            before = await statements.load_device(conn, device_id)
            doomed: set[Tag] = set()
            for tag_key, tag_value, spec in parsed:
                hits = {
                    t
                    for t in before.tags
                    if t[0] == tag_key and (tag_value is None or t[1] == tag_value)
                }
                if not hits:
                    raise NotFoundError(f"device {before.id!r} has no tag matching {spec!r}")
                doomed |= hits
            if doomed:
                await conn.executemany(
                    "DELETE FROM device_tags WHERE device_id = ? AND key = ? AND value = ?",
                    [(before.id, k, v) for k, v in doomed],
                )
                await statements.touch_device(conn, before.id)
            return await statements.load_device(conn, before.id)

    async def remove_devices(self, ids: Iterable[str]) -> list[str]:
        wanted = dedupe(_as_str_list(ids, "device ids"))
        async with self._write() as conn:
            missing = await statements.missing_devices(conn, wanted)
            if missing:
                raise NotFoundError(f"no device {missing[0]!r} (nothing removed)")
            for batch in chunks(wanted):
                await conn.execute(
                    f"DELETE FROM devices WHERE id IN ({placeholders(len(batch))})", batch
                )
        log.info("removed %d devices", len(wanted))
        return list(wanted)

    async def device_exists(self, device_id: str) -> bool:
        async with self._lock:
            return await statements.device_exists(self._conn, device_id)

    async def existing_device_ids(self, ids: Iterable[str]) -> frozenset[str]:
        """Which of these ids are registered devices (batched; for the broker's polling)."""
        wanted = dedupe(ids)
        async with self._read() as conn:
            missing = set(await statements.missing_devices(conn, wanted))
        return frozenset(d for d in wanted if d not in missing)

    async def count_devices(self) -> int:
        rows = await self._fetchall("SELECT count(*) FROM devices")
        return int(rows[0][0])

    # --- keys: create -------------------------------------------------------------------

    async def create_key(
        self,
        *,
        name: str | None = None,
        description: str | None = None,
        device_ids: Iterable[str] = (),
        device_tags: Iterable[Tag | str] = (),
        all_devices: bool | None = None,
        address_mode: AddressMode | str = AddressMode.ALL,
        addresses: Iterable[str] = (),
        topic_mode: TopicMode | str = TopicMode.NONE,
        pub_topics: Iterable[str] = (),
        sub_topics: Iterable[str] = (),
        expires_at: datetime | str | None = None,
    ) -> tuple[AccessKey, str]:
        """Create one key; returns (key, secret). This is the only time the secret exists:
        only its salted hash is stored. all_devices=None means True when neither
        device_ids nor device_tags is given."""
        (created,) = await self.create_keys(
            [
                {
                    "name": name,
                    "description": description,
                    "device_ids": device_ids,
                    "device_tags": device_tags,
                    "all_devices": all_devices,
                    "address_mode": address_mode,
                    "addresses": addresses,
                    "topic_mode": topic_mode,
                    "pub_topics": pub_topics,
                    "sub_topics": sub_topics,
                    "expires_at": expires_at,
                }
            ]
        )
        return created

    async def create_keys(self, specs: Iterable[Mapping[str, Any]]) -> list[tuple[AccessKey, str]]:
        """Create many keys in one transaction; every spec is validated before any write."""
        validated: list[KeySpec] = []
        for index, spec in enumerate(specs):
            if not isinstance(spec, Mapping):
                raise ValidationError(f"invalid key spec #{index + 1} {spec!r}: expected a mapping")
            validated.append(validate_key_spec(spec, self.device_prefix))
        names = [s.name for s in validated if s.name is not None]
        duplicated = _first_duplicate(names)
        if duplicated is not None:
            raise ConflictError(f"key name {duplicated!r} is given to more than one new key")
        now = now_micros()
        minted = [(credentials.new_key(), credentials.new_secret()) for _ in validated]
        async with self._write() as conn:
            await self._check_key_limit(conn, len(validated))
            missing = await statements.missing_devices(
                conn, dedupe(d for s in validated for d in s.device_ids)
            )
            if missing:
                raise ValidationError(f"unknown device id {missing[0]!r} in key device restriction")
            for batch in chunks(names):
                rows = await conn.execute_fetchall(
                    f"SELECT name FROM access_keys WHERE name IN ({placeholders(len(batch))})",
                    batch,
                )
                for (taken,) in rows:
                    raise ConflictError(f"key name {taken!r} is already used by another key")
            loaded = await statements.insert_keys(conn, validated, minted, now)
        log.info("created %d access keys", len(minted))
        return [(loaded[key], secret) for key, secret in minted]

    async def _check_key_limit(self, conn: aiosqlite.Connection, adding: int) -> None:
        if not self.max_keys:
            return
        existing = await statements.count(conn, "SELECT count(*) FROM access_keys")
        if existing + adding > self.max_keys:
            raise LimitError(
                f"key limit of {self.max_keys} reached: {existing} keys exist, "
                f"cannot create {adding} more"
            )

    # --- keys: read -------------------------------------------------------------------

    async def get_key(self, key_or_prefix: str) -> AccessKey:
        """The key with this id, or the only key whose id starts with this prefix
        (at least 8 characters)."""
        async with self._read() as conn:
            key = await statements.resolve_key(conn, key_or_prefix)
            return (await statements.load_keys(conn, [key]))[key]

    async def get_key_by_name(self, name: str) -> AccessKey | None:
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE k.name = ?", (name,)
        )
        return row_to_key(rows[0]) if rows else None

    async def keys_by_id(self, keys: Iterable[str]) -> dict[str, AccessKey]:
        """Batch lookup by full key id; missing keys are simply absent (broker polling)."""
        async with self._read() as conn:
            return await statements.load_keys(conn, dedupe(keys))

    async def list_keys(self, query: Mapping[str, Any] | str | None = None) -> list[AccessKey]:
        """Keys matching a Losant-style advanced query (see keystore.query)."""
        where, params = compile_query(query)
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS} FROM access_keys k WHERE {where} ORDER BY k.created_at, k.key",
            params,
        )
        return [row_to_key(r) for r in rows]

    async def count_keys(self) -> int:
        rows = await self._fetchall("SELECT count(*) FROM access_keys")
        return int(rows[0][0])

    # --- keys: change -------------------------------------------------------------------

    async def update_key(
        self,
        key_or_prefix: str,
        *,
        name: str | None | Unset = UNSET,
        description: str | None | Unset = UNSET,
        address_mode: Any = UNSET,
        addresses: Iterable[str] | Unset = UNSET,
        topic_mode: Any = UNSET,
        pub_topics: Iterable[str] | Unset = UNSET,
        sub_topics: Iterable[str] | Unset = UNSET,
        expires_at: datetime | str | None | Unset = UNSET,
        device_ids: Any = UNSET,
        device_tags: Any = UNSET,
        all_devices: Any = UNSET,
    ) -> AccessKey:
        """Change the given fields (UNSET leaves one alone; None clears name, description
        or expiry). The device restriction is immutable: passing it is a ConflictError."""
        changes: dict[str, Any] = {}
        if name is not UNSET:
            changes["name"] = validate_key_name(name)
        if description is not UNSET:
            changes["description"] = validate_description(description)
        if expires_at is not UNSET:
            changes["expires_at"] = coerce_utc(expires_at, "expiration date")
        if address_mode is not UNSET:
            changes["address_mode"] = coerce_address_mode(address_mode)
        if addresses is not UNSET:
            changes["addresses"] = validate_addresses(addresses)
        if topic_mode is not UNSET:
            changes["topic_mode"] = coerce_topic_mode(topic_mode)
        if pub_topics is not UNSET:
            changes["pub_topics"] = validate_topic_list(
                pub_topics, "pub topics", self.device_prefix
            )
        if sub_topics is not UNSET:
            changes["sub_topics"] = validate_topic_list(
                sub_topics, "sub topics", self.device_prefix
            )
        restriction = (device_ids, device_tags, all_devices)
        async with self._write() as conn:
            key = await statements.resolve_key(conn, key_or_prefix)
            if any(v is not UNSET for v in restriction):
                raise ConflictError(
                    f"device restriction of key {short(key)} cannot be changed after "
                    "creation; create a new key"
                )
            current = (await statements.load_keys(conn, [key]))[key]
            check_modes(
                changes.get("address_mode", current.address_mode),
                changes.get("addresses", current.addresses),
                changes.get("topic_mode", current.topic_mode),
                changes.get("pub_topics", current.pub_topics),
                changes.get("sub_topics", current.sub_topics),
            )
            if changes.get("name") is not None:
                rows = await conn.execute_fetchall(
                    "SELECT key FROM access_keys WHERE name = ? AND key != ?",
                    (changes["name"], key),
                )
                if rows:
                    raise ConflictError(
                        f"key name {changes['name']!r} is already used by another key"
                    )
            if changes:
                await statements.apply_key_changes(conn, key, changes)
            return (await statements.load_keys(conn, [key]))[key]

    async def set_status(self, keys: Iterable[str], status: KeyStatus | str) -> list[AccessKey]:
        new_status = coerce_status(status)
        refs = dedupe(_as_str_list(keys, "keys"))
        async with self._write() as conn:
            full = dedupe([await statements.resolve_key(conn, ref) for ref in refs])
            now = now_micros()
            await conn.executemany(
                "UPDATE access_keys SET status = ?, updated_at = ? WHERE key = ? AND status != ?",
                [(new_status.value, now, k, new_status.value) for k in full],
            )
            loaded = await statements.load_keys(conn, full)
        log.info("set %d keys %s", len(full), new_status.value)
        return [loaded[k] for k in full]

    async def delete_keys(self, keys: Iterable[str]) -> list[str]:
        refs = dedupe(_as_str_list(keys, "keys"))
        async with self._write() as conn:
            full = dedupe([await statements.resolve_key(conn, ref) for ref in refs])
            for batch in chunks(full):
                await conn.execute(
                    f"DELETE FROM access_keys WHERE key IN ({placeholders(len(batch))})", batch
                )
        log.info("deleted %d keys: %s", len(full), ", ".join(short(k) for k in full[:20]))
        return list(full)

    # --- used by the broker at CONNECT --------------------------------------------------

    async def authenticate(self, key: str, secret: str) -> AccessKey | None:
        """The key if `secret` is its secret, else None. Unknown keys cost the same as
        wrong secrets. Status and expiry are the caller's to check."""
        if not isinstance(key, str) or not isinstance(secret, str):
            credentials.verify_secret("", None, None)
            return None
        rows = await self._fetchall(
            f"SELECT {KEY_COLUMNS}, k.salt, k.secret_hash FROM access_keys k WHERE k.key = ?",
            (key,),
        )
        salt, stored = (rows[0][-2], rows[0][-1]) if rows else (None, None)
        if not credentials.verify_secret(secret, salt, stored):
            return None
        return row_to_key(rows[0])

    async def resolve_scope(self, key: AccessKey) -> frozenset[str] | None:
        """None for an unrestricted key; else the existing devices listed by id or
        carrying any listed tag pair, as of now. Both halves are index lookups."""
        if key.all_devices:
            return None
        rows = await self._fetchall(SCOPE_SQL, (key.key, key.key))
        return frozenset(r[0] for r in rows)

    async def device_matches(self, key: AccessKey, device_id: str) -> bool:
        """Does this one existing device fall within the key's device restriction now?"""
        if key.all_devices:
            return await self.device_exists(device_id)
        rows = await self._fetchall(DEVICE_MATCH_SQL, (key.key, device_id, key.key, device_id))
        return bool(rows[0][0])

    async def mark_keys_used(self, keys: Iterable[str], when: datetime) -> None:
        stamp = to_micros(when)
        rows = [(stamp, k) for k in dedupe(keys)]
        if rows:
            async with self._write() as conn:
                await conn.executemany("UPDATE access_keys SET last_used = ? WHERE key = ?", rows)

    async def set_devices_connected(
        self, ids: Iterable[str], connected: bool, when: datetime
    ) -> None:
        stamp = to_micros(when)
        rows = [(int(connected), stamp, d) for d in dedupe(ids)]
        if rows:
            async with self._write() as conn:
                await conn.executemany(
                    "UPDATE devices SET connected = ?, last_seen = ? WHERE id = ?", rows
                )


# --- helpers that run inside a transaction -------------------------------------------------


def _as_str_list(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise ValidationError(f"invalid {what} {values!r}: expected a list")
    out = list(values)
    for v in out:
        if not isinstance(v, str):
            raise ValidationError(f"invalid {what[:-1] if what.endswith('s') else what} {v!r}")
    return out


def _first_duplicate(names: list[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None
