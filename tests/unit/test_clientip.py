"""Client address: normalisation, X-Forwarded-For from trusted proxies, PROXY v1/v2."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core.clientip import (
    PROXY_V2_SIGNATURE,
    ProxyInfo,
    client_ip_from_forwarded,
    parse_proxy_v1,
    parse_proxy_v2,
)
from broker.policy.addresses import TrustedProxies, normalize_ip
from keystore.errors import ValidationError

LOOPBACK = TrustedProxies(["127.0.0.0/8", "::1/128"])
PROXIES = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),  # IPv4-mapped IPv6 is IPv4
        ("[2001:db8::1]", "2001:db8::1"),
        ("2001:DB8:0::1", "2001:db8::1"),
        ("fe80::1%eth0", None),  # zone ids: local only
        ("1.2.3", None),
        ("1.2.3.4.5", None),
        ("300.1.1.1", None),
        ("example.com", None),
        ("", None),
        ("unknown", None),
    ],
)
def test_normalize_ip(text: str, expected: str | None) -> None:
    assert normalize_ip(text) == expected


def test_trusted_proxies_membership() -> None:
    assert LOOPBACK.contains("127.0.0.1") and LOOPBACK.contains("::1")
    assert LOOPBACK.contains("::ffff:127.0.0.1")  # mapped peer matches IPv4 entry
    assert not LOOPBACK.contains("10.0.0.1") and not LOOPBACK.contains("garbage")
    mapped_rule = TrustedProxies(["::ffff:192.168.0.0/112"])
    assert mapped_rule.contains("192.168.1.1") and not mapped_rule.contains("192.169.0.1")
    with pytest.raises(ValidationError, match="10.0.0.0/33"):
        TrustedProxies(["10.0.0.0/33"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # Untrusted peer: headers ignored, cannot be spoofed.
        ("203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
        ("::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
        # Trusted peer: right-most non-proxy hop.
        ("10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
        ("10.0.0.1", ["6.6.6.6, 1.1.1.1, 10.0.0.2"], "1.1.1.1"),  # 6.6.6.6 is forgeable
        ("10.0.0.1", ["6.6.6.6", "1.1.1.1, 10.0.0.2"], "1.1.1.1"),  # values joined in order
        ("10.0.0.1", ["1.1.1.1,10.0.0.3", "10.0.0.2"], "1.1.1.1"),
        ("10.0.0.1", ["2001:db8::7, 2001:db8:ffff::1"], "2001:db8::7"),
        ("10.0.0.1", ["::ffff:1.1.1.1"], "1.1.1.1"),
        # Garbage stops the walk: last good hop, or the peer.
        ("10.0.0.1", ["1.1.1.1, garbage"], "10.0.0.1"),
        ("10.0.0.1", ["1.1.1.1, garbage, 10.0.0.2"], "10.0.0.2"),
        ("10.0.0.1", ["1.1.1.1:1234"], "10.0.0.1"),
        # All trusted: the left-most.
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
        ("10.0.0.1", [], "10.0.0.1"),
        ("10.0.0.1", ["", " , "], "10.0.0.1"),
        ("10.0.0.1", ["1.1.1.1, "], "1.1.1.1"),  # trailing comma: empty element skipped
    ],
)
def test_client_ip_from_forwarded(peer: str, xff: list[str], expected: str) -> None:
    assert client_ip_from_forwarded(peer, xff, PROXIES) == expected


@given(
    st.lists(st.ip_addresses().map(str), max_size=6),
    st.ip_addresses().map(str),
)
def test_forwarded_never_returns_a_trusted_hop_unless_all_are(hops: list[str], peer: str) -> None:
    result = client_ip_from_forwarded(peer, [", ".join(hops)], PROXIES)
    if not PROXIES.contains(peer):
        assert result == normalize_ip(peer)
    elif any(not PROXIES.contains(h) for h in hops):
        right_most = next(h for h in reversed(hops) if not PROXIES.contains(h))
        assert result == normalize_ip(right_most)
    else:
        assert result == normalize_ip(hops[0] if hops else peer)


# ------------------------------------------------------------------------ PROXY v1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 1883\r\n",
            ProxyInfo("192.0.2.1", 56324, "198.51.100.2", 1883),
        ),
        (
            b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 8883\r\n",
            ProxyInfo("2001:db8::1", 65535, "2001:db8::2", 8883),
        ),
        (
            b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            ProxyInfo("192.0.2.1", 1, "::1", 2),
        ),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    ],
)
def test_proxy_v1_good(line: bytes, expected: ProxyInfo | None) -> None:
    assert parse_proxy_v1(line) == expected


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 1883\n",  # no CR
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # missing port
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 1883 x\r\n",
        b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
        b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",  # double space
        b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY TCP4 \xff.0.2.1 198.51.100.2 1 2\r\n",
        b"GET / HTTP/1.1\r\n",
        b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n",  # over 107 bytes
    ],
)
def test_proxy_v1_malformed(line: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_proxy_v1(line)


# ------------------------------------------------------------------------ PROXY v2


def v2(command: int, family: int, body: bytes, version: int = 2) -> bytes:
    return PROXY_V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack(
        "!H", len(body)
    ) + body


def v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + struct.pack("!HH", sport, dport)
    )


def test_proxy_v2_good() -> None:
    assert parse_proxy_v2(v2(1, 0x11, v4_block("192.0.2.1", "198.51.100.2", 4000, 1883))) == (
        ProxyInfo("192.0.2.1", 4000, "198.51.100.2", 1883)
    )
    with_tlv = v4_block("192.0.2.1", "198.51.100.2", 1, 2) + b"\x04\x00\x01\x00"
    assert parse_proxy_v2(v2(1, 0x11, with_tlv)) == ProxyInfo("192.0.2.1", 1, "198.51.100.2", 2)
    assert parse_proxy_v2(v2(1, 0x21, v6_block("2001:db8::1", "::1", 5, 6))) == ProxyInfo(
        "2001:db8::1", 5, "::1", 6
    )
    mapped = v6_block("::ffff:192.0.2.9", "::1", 5, 6)
    assert parse_proxy_v2(v2(1, 0x21, mapped)).src_ip == "192.0.2.9"  # type: ignore[union-attr]
    assert parse_proxy_v2(v2(0, 0x00, b"")) is None  # LOCAL: use the peer
    assert parse_proxy_v2(v2(0, 0x11, v4_block("1.1.1.1", "2.2.2.2", 1, 2))) is None
    assert parse_proxy_v2(v2(1, 0x00, b"")) is None  # UNSPEC
    assert parse_proxy_v2(v2(1, 0x31, b"\x00" * 216)) is None  # AF_UNIX


@pytest.mark.parametrize(
    "header",
    [
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12,  # bad signature
        v2(1, 0x11, v4_block("1.1.1.1", "2.2.2.2", 1, 2), version=1),
        v2(2, 0x11, v4_block("1.1.1.1", "2.2.2.2", 1, 2)),  # unknown command
        v2(1, 0x11, b"\x00" * 11),  # short IPv4 block
        v2(1, 0x21, b"\x00" * 35),  # short IPv6 block
        v2(1, 0x41, b"\x00" * 12),  # unknown family
        v2(1, 0x13, v4_block("1.1.1.1", "2.2.2.2", 1, 2)),  # unknown transport
        v2(1, 0x11, v4_block("1.1.1.1", "2.2.2.2", 1, 2))[:-1],  # truncated
        v2(1, 0x11, v4_block("1.1.1.1", "2.2.2.2", 1, 2)) + b"x",  # trailing data
        PROXY_V2_SIGNATURE[:10],
    ],
)
def test_proxy_v2_malformed(header: bytes) -> None:
    with pytest.raises(ValidationError):
        parse_proxy_v2(header)
