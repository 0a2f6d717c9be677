"""The bench's burst workload (scripts/bench --only burst): publishers paced only by their
PUBACKs, at 20, 100 and 1,000 in flight, 1 -> 1 and 1 -> 100; fan-in from 50 and 1,000
devices, each from its own address, to one wildcard subscriber; and one stalled
subscriber among 100 prompt ones. Each row reports msg/s and the messages lost
(expected deliveries minus delivered: 0 in every row is the target)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .burst import BurstResult, BurstSpec, Device, run_burst_split
from .flows import Cred
from .keystores import BurstCreds


@dataclass(frozen=True)
class Case:
    row: str
    label: str
    publishers: int
    subscribers: int
    messages: int  # per publisher
    inflight: int
    own_address: bool = False
    stalled: int = 0


def cases(quick: bool) -> list[Case]:
    scale = 10 if quick else 1
    out = []
    for inflight in (20, 100, 1000):
        out.append(Case(f"burst_1to1_w{inflight}", f"burst 1 -> 1, {inflight} in flight",
                        1, 1, 30_000 // scale, inflight))
    for inflight in (20, 100, 1000):
        out.append(Case(f"burst_1to100_w{inflight}", f"burst 1 -> 100, {inflight} in flight "
                        "(deliveries/s)", 1, 100, 2_000 // scale, inflight))
    out.append(Case("burst_fanin_50", "burst fan-in 50 devices (own addresses) -> 1, 20 in "
                    "flight", 50, 1, 600 // scale, 20, own_address=True))
    out.append(Case("burst_fanin_1000", "burst fan-in 1,000 devices (own addresses) -> 1, 20 "
                    "in flight", 1000, 1, 30 // scale, 20, own_address=True))
    return out


def spec_for(case: Case, kind: str, port: int, creds: BurstCreds | None) -> BurstSpec:
    def cred(client_id: str) -> Cred:
        return Cred(client_id, creds.key, creds.secret) if creds is not None else Cred(
            f"{kind}-{client_id}")

    prefix = "losant" if creds is not None else "burst"
    return BurstSpec(
        host="127.0.0.1", port=port,
        publishers=tuple(
            Device(cred(f"dev-{i}"), f"{prefix}/dev-{i}/state",
                   f"127.1.{i // 250}.{i % 250 + 2}" if case.own_address else None)
            for i in range(case.publishers)),
        subscribers=tuple(cred(f"sub-{i}") for i in range(case.subscribers)),
        stalled=tuple(cred(f"sub-{case.subscribers + i}") for i in range(case.stalled)),
        sub_filter=f"{prefix}/+/state", messages=case.messages, inflight=case.inflight,
        timeout=600.0)


Put = Callable[..., None]


def record(put: Put, notes: list[str], case: Case, kind: str, result: BurstResult,
           log: Callable[[str], None]) -> None:
    expected = result.sent * case.subscribers
    lost = expected - sum(result.delivered) if result.delivered else None
    details = {**result.as_dict(), "expected_deliveries": expected,
               "sent_of": case.messages * case.publishers}
    put(case.row, "burst", case.label, "msg/s", kind, round(result.rate, 1) or None, details)
    put(f"{case.row}_lost", "burst", "  delivered short of sent", "msgs", kind, lost, details,
        higher_is_better=False)
    if result.errors:
        notes.append(f"{kind} {case.row}: {result.errors[0]}")
    if result.disconnected:
        notes.append(f"{kind} {case.row}: the broker disconnected {len(result.disconnected)} "
                     f"subscriber(s), first {result.disconnected[0]}")
    log(f"  {kind:9} {case.row:18} {result.rate:,.0f} msg/s  sent {result.sent:,}/"
        f"{case.messages * case.publishers:,}  delivered {sum(result.delivered):,}/{expected:,}"
        + (f"  disconnected {len(result.disconnected)}" if result.disconnected else ""))


def run_cases(put: Put, notes: list[str], kind: str, port: int, creds: BurstCreds | None,
              quick: bool, log: Callable[[str], None]) -> None:
    for case in cases(quick):
        record(put, notes, case, kind, run_burst_split(spec_for(case, kind, port, creds)), log)


def stalled_case(quick: bool) -> Case:
    return Case("burst_stalled", "burst 1 -> 100 + 1 stalled subscriber, 1,000 in flight",
                1, 100, 3_000 // (10 if quick else 1), 1000, stalled=1)


def run_stalled(put: Put, notes: list[str], kind: str, port: int, creds: BurstCreds | None,
                quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The 100 prompt subscribers' rate once the stalled one is gone (keybroker: after
    slow_consumer_timeout) over their rate with no stalled subscriber at all."""
    case = stalled_case(quick)
    free = run_burst_split(spec_for(replace(case, stalled=0), kind, port, creds))
    held = run_burst_split(spec_for(case, kind, port, creds))
    record(put, notes, case, kind, held, log)
    after, without = held.rate_after_stall, free.rate_after_stall
    ratio = round(after / without, 3) if after and without else None
    put("burst_stalled_ratio", "burst", "  100 subscribers' rate after the stall / without",
        "x", kind, ratio, {"without": round(without or 0, 1), "after": round(after or 0, 1)})
    log(f"  {kind:9} burst_stalled ratio {ratio} (without {without or 0:,.0f}/s, after "
        f"{after or 0:,.0f}/s)")
    return {"without": free.as_dict(), "with": held.as_dict()}
