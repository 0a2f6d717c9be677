"""ns per policy decision for the bench's restricted session (tag scope of 10,000 devices,
``only`` lists). scripts/bench_policy has the wider table of cases; this measures the
decisions the message-rate workloads make, with the same filter lists."""

from __future__ import annotations

import timeit
from typing import Any

from .keystores import PUB_TOPICS, SUB_TOPICS


def measure_policy(number: int, repeat: int = 5) -> dict[str, Any]:
    from broker.policy import SessionPolicy, check_publish, check_receive, check_subscribe
    from broker.topics import FilterSet
    from keystore.models import TopicMode

    policy = SessionPolicy(
        device_prefix="losant",
        scope=frozenset(f"bench-{i:05d}" for i in range(10_000)),
        topic_mode=TopicMode.ONLY,
        pub=FilterSet(PUB_TOPICS),
        sub=FilterSet(SUB_TOPICS),
    )
    cases = {
        "check_publish custom topic in only-list": (check_publish, "bench/load", True),
        "check_publish device topic in scope": (check_publish, "losant/bench-04242/state", True),
        "check_publish device topic out of scope": (check_publish, "losant/other-001/state",
                                                    False),
        "check_receive custom topic in only-list": (check_receive, "bench/load", True),
        "check_receive other scope's topic": (check_receive, "other/x", False),
        "check_subscribe custom filter": (check_subscribe, "bench/#", True),
        "check_subscribe '#'": (check_subscribe, "#", True),
        "check_subscribe fleet filter (denied)": (check_subscribe, "fleet/dev1/command", False),
    }
    out: dict[str, Any] = {}
    for name, (fn, arg, expected) in cases.items():
        decision = fn(policy, arg)
        best = min(timeit.repeat(lambda fn=fn, arg=arg: fn(policy, arg), number=number,
                                 repeat=repeat))
        out[name] = {
            "ns": round(best / number * 1e9, 1),
            "allowed": bool(decision.allowed),
            "expected": expected,
            "reason": decision.reason,
        }
    return out
