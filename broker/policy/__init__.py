"""Access decisions, pure (no I/O, no awaits, no amqtt): what a session may do
(``decisions``), client addresses (``addresses``), the brute-force guard (``guard``) and
per-message limits (``limits``). See docs/access.md and docs/limits.md."""

from broker.policy.addresses import (
    TrustedProxies,
    compile_addresses,
    normalize_ip,
    parse_ip,
    source_of,
)
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
    "compile_addresses",
    "normalize_ip",
    "parse_ip",
    "source_of",
]
