"""Access decisions, pure (no I/O, no awaits, no amqtt): what a session may do
(``decisions``), client addresses (``addresses``), the brute-force guard (``guard``) and
per-message limits (``limits``), and SUBSCRIBE by containment for engines that check a filter
only once (``containment``). See docs/access.md, docs/limits.md and docs/cluster.md."""

from broker.policy.addresses import (
    TrustedProxies,
    compile_addresses,
    normalize_ip,
    parse_ip,
    source_of,
)
from broker.policy.containment import check_subscribe_within
from broker.policy.decisions import (
    ALLOW,
    CONNACK_CODE,
    ConnectFacts,
    Decision,
    PolicyCache,
    SessionPolicy,
    check_address,
    check_connect,
    check_key_address,
    check_publish,
    check_receive,
    check_subscribe,
)

__all__ = [
    "ALLOW",
    "CONNACK_CODE",
    "ConnectFacts",
    "Decision",
    "PolicyCache",
    "SessionPolicy",
    "TrustedProxies",
    "check_address",
    "check_connect",
    "check_key_address",
    "check_publish",
    "check_receive",
    "check_subscribe",
    "check_subscribe_within",
    "compile_addresses",
    "normalize_ip",
    "parse_ip",
    "source_of",
]
