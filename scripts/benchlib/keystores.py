"""Keystores for the bench, seeded in-process through the ``KeyStore`` library.

* ``seed_flow_keystore``: small and fresh per run — devices tagged ``fleet=bench`` with a
  restricted key (tag query + ``only`` topic lists), a topic-mode-``all`` key for the
  fleet idle subscriber, another scope's key for the ``#`` observer, and per-device keys
  for the memory workload.
* ``ensure_big_keystore``: N devices and N keys (1 M in a full run), seeded once into a
  cached file and reused while its sidecar JSON (the few secrets the bench uses)
  matches the requested size.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from keystore import KeyStore

from .flows import Cred

BENCH_TOPIC = "bench/load"
# The restricted key's `only` lists: the bench topic plus a few others, so a decision
# walks a realistic filter set rather than a single entry.
PUB_TOPICS = ["bench/load", "bench/+/cmd", "alerts/+/raised", "ops/metrics"]
SUB_TOPICS = ["bench/#", "alerts/#", "ops/+"]
BIG_TAG = ("group", "g10k")


@dataclass(frozen=True)
class FlowCreds:
    restricted: tuple[str, str]  # key, secret: tag query fleet=bench, topic mode only
    fleet_all: tuple[str, str]  # tag query fleet=bench, topic mode all
    other: tuple[str, str]  # tag query fleet=other, topic mode only other/#
    bench_devices: tuple[str, ...]
    other_devices: tuple[str, ...]
    per_device: tuple[tuple[str, str, str], ...]  # (device id, key, secret)

    def restricted_cred(self, index: int) -> Cred:
        return Cred(self.bench_devices[index], *self.restricted)


async def seed_flow_keystore(path: Path, *, bench_devices: int, per_device_keys: int) -> FlowCreds:
    bench = [f"bench-{i:05d}" for i in range(bench_devices)]
    other = [f"other-{i:03d}" for i in range(10)]
    mem = [f"mem-{i:05d}" for i in range(per_device_keys)]
    async with KeyStore.open(str(path)) as ks:
        await ks.upsert_devices(
            [(d, None, [("fleet", "bench")]) for d in bench]
            + [(d, None, [("fleet", "other")]) for d in other]
            + [(d, None, [("fleet", "mem")]) for d in mem]
        )
        restricted = await ks.create_key(
            name="bench-restricted", device_tags=[("fleet", "bench")], topic_mode="only",
            pub_topics=PUB_TOPICS, sub_topics=SUB_TOPICS,
        )
        fleet_all = await ks.create_key(
            name="bench-fleet-all", device_tags=[("fleet", "bench")], topic_mode="all",
        )
        other_key = await ks.create_key(
            name="bench-other-scope", device_tags=[("fleet", "other")], topic_mode="only",
            pub_topics=["other/#"], sub_topics=["other/#"],
        )
        created = await ks.create_keys([{"device_ids": [d]} for d in mem])
    return FlowCreds(
        restricted=(restricted[0].key, restricted[1]),
        fleet_all=(fleet_all[0].key, fleet_all[1]),
        other=(other_key[0].key, other_key[1]),
        bench_devices=tuple(bench),
        other_devices=tuple(other),
        per_device=tuple((d, k.key, s) for d, (k, s) in zip(mem, created, strict=True)),
    )


@dataclass(frozen=True)
class BigCreds:
    devices: int
    keys: int
    tag_matches: int
    single: tuple[tuple[str, str, str], ...]  # (device id, key, secret), one device each
    tag_key: tuple[str, str]  # matches `tag_matches` devices through BIG_TAG
    tag_devices: tuple[str, ...]  # a few device ids inside the tag key's scope
    seed_seconds: float


def _device_id(i: int) -> str:
    return f"d{i:07d}"


async def _seed_big(target: str, n: int, tag_matches: int, log: Any) -> BigCreds:
    """``target``: an SQLite file or (with the PostgreSQL backend) a postgresql:// URL."""
    started = time.perf_counter()
    chunk = 50_000
    async with KeyStore.open(target) as ks:
        for lo in range(0, n, chunk):
            await ks.upsert_devices(
                (_device_id(i), None,
                 [BIG_TAG, ("shard", str(i % 1000))] if i < tag_matches
                 else [("shard", str(i % 1000))])
                for i in range(lo, min(n, lo + chunk))
            )
            log(f"  devices {min(n, lo + chunk):,}/{n:,}")
        # The first keys' secrets are kept (the bench connects with them); the rest
        # exist to make the key table realistically large. Total keys: n.
        single = await ks.create_keys([{"device_ids": [_device_id(i)]} for i in range(4)])
        tag_key = await ks.create_key(name="bench-tag-10k", device_tags=[BIG_TAG])
        for lo in range(4, n - 1, chunk):
            await ks.create_keys(
                [{"device_ids": [_device_id(i)]} for i in range(lo, min(n - 1, lo + chunk))]
            )
            log(f"  keys {min(n - 1, lo + chunk):,}/{n:,}")
        total_keys = await ks.count_keys()
    return BigCreds(
        devices=n,
        keys=total_keys,
        tag_matches=tag_matches,
        single=tuple((_device_id(i), k.key, s) for i, (k, s) in enumerate(single)),
        tag_key=(tag_key[0].key, tag_key[1]),
        tag_devices=tuple(_device_id(i) for i in range(0, tag_matches, max(1, tag_matches // 64))),
        seed_seconds=round(time.perf_counter() - started, 1),
    )


async def ensure_big_keystore(path: Path, n: int, log: Any) -> tuple[BigCreds, bool]:
    """Return (creds, reused). Reseeds when the file or its sidecar does not match n."""
    sidecar = path.with_suffix(".json")
    tag_matches = min(10_000, n)
    if path.exists() and (known := load_creds(sidecar, n)) is not None:
        return known, True
    for stale in (path, sidecar, Path(f"{path}-wal"), Path(f"{path}-shm")):
        stale.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"seeding {path} with {n:,} devices and {n:,} keys (once; reused on later runs)")
    creds = await _seed_big(str(path), n, tag_matches, log)
    save_creds(sidecar, creds)
    return creds, False


def load_creds(sidecar: Path, n: int) -> BigCreds | None:
    """The creds a sidecar holds, if it describes a keystore of ``n`` devices."""
    try:
        raw = json.loads(sidecar.read_text())
        creds = BigCreds(**{**raw, "single": tuple(tuple(x) for x in raw["single"]),
                            "tag_key": tuple(raw["tag_key"]),
                            "tag_devices": tuple(raw["tag_devices"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    return creds if creds.devices == n and creds.tag_matches == min(10_000, n) else None


def save_creds(sidecar: Path, creds: BigCreds) -> None:
    fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(creds), out)


async def ensure_big_database(url: str, n: int, sidecar: Path, log: Any) -> tuple[BigCreds, bool]:
    """``ensure_big_keystore`` for a PostgreSQL database (a postgresql:// URL): seeded
    once when empty, reused while ``sidecar`` matches; a non-empty database that the
    sidecar does not describe is an error (it is never wiped)."""
    async with KeyStore.open(url) as ks:
        existing = await ks.count_keys(every_app=True)
    creds = load_creds(sidecar, n)
    if creds is not None and existing == creds.keys:
        return creds, True
    if existing:
        raise RuntimeError(f"{url}: holds {existing:,} keys the bench did not seed; "
                           "give it an empty database")
    log(f"seeding {url} with {n:,} devices and {n:,} keys (once; reused on later runs)")
    creds = await _seed_big(url, n, min(10_000, n), log)
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    save_creds(sidecar, creds)
    return creds, False


@dataclass(frozen=True)
class BurstCreds:
    key: str
    secret: str
    devices: int
    subscribers: int


async def seed_burst_keystore(path: Path, *, devices: int, subscribers: int) -> BurstCreds:
    """Devices dev-N (publishers) and sub-N (subscribers), one unrestricted key for all:
    the burst workload measures flow control, not the policy."""
    async with KeyStore.open(str(path)) as ks:
        await ks.upsert_devices([(f"dev-{i}", None, []) for i in range(devices)]
                                + [(f"sub-{i}", None, []) for i in range(subscribers)])
        key, secret = await ks.create_key(name="bench-burst")
    return BurstCreds(key.key, secret, devices, subscribers)
