"""Who is the client? X-Forwarded-For and the PROXY protocol, parsed purely.

Headers that name another address are believed only when the TCP peer is a trusted
proxy (docs/access.md#client-ip); from anyone else they are ignored, so they cannot be
spoofed. Addresses go through broker.policy.addresses (IPv4-mapped IPv6 is IPv4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from netaddr import AddrFormatError, IPAddress

from broker.policy.addresses import TrustedProxies, normalize_ip
from keystore.errors import ValidationError


def client_ip_from_forwarded(
    peer_ip: str, xff_values: list[str], trusted: TrustedProxies
) -> str:
    """The client address for a connection from ``peer_ip`` carrying X-Forwarded-For.

    Untrusted peer: the peer, headers ignored. Trusted peer: walk the hops right to
    left (all header values joined in order) and return the first that is not a trusted
    proxy. An unparsable entry stops the walk — whoever wrote it is not trusted to
    vouch for anything further left — and the last good hop (or the peer) is returned.
    If every hop is a trusted proxy, the left-most one.
    """
    peer = normalize_ip(peer_ip) or peer_ip
    if not trusted.contains(peer):
        return peer
    hops = [hop for value in xff_values for hop in value.split(",")]
    client = peer
    for raw in reversed(hops):
        if not raw.strip():
            continue  # "a, , b" or a trailing comma: an empty element, not an address
        hop = normalize_ip(raw)
        if hop is None:
            return client
        client = hop
        if not trusted.contains(hop):
            return hop
    return client


# ------------------------------------------------------------------ PROXY protocol


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int


PROXY_V1_MAX = 107  # bytes including "\r\n" (haproxy proxy-protocol.txt §2.1)
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_HEADER_LEN = 16  # signature + ver/cmd + family + length


def _port(text: str, line: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValidationError(f"invalid PROXY v1 header {line!r}: bad port {text!r}")
    return int(text)


def parse_proxy_v1(line: bytes) -> ProxyInfo | None:
    """Parse ``PROXY TCP4|TCP6|UNKNOWN ...\\r\\n``; None for UNKNOWN (use the peer)."""
    if len(line) > PROXY_V1_MAX:
        raise ValidationError(f"invalid PROXY v1 header: {len(line)} bytes, at most 107")
    if not line.startswith(b"PROXY ") or not line.endswith(b"\r\n"):
        raise ValidationError(f"invalid PROXY v1 header {line!r}: bad framing")
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ValidationError(f"invalid PROXY v1 header {line!r}: not ASCII") from None
    parts = text.split(" ")
    if parts[1] == "UNKNOWN":
        return None  # the rest may be anything; the receiver must ignore it
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ValidationError(f"invalid PROXY v1 header {line!r}: bad fields")
    version = 4 if parts[1] == "TCP4" else 6
    addresses: list[str] = []
    for text_ip in parts[2:4]:
        try:
            address = IPAddress(text_ip)
        except (AddrFormatError, ValueError):
            raise ValidationError(
                f"invalid PROXY v1 header {line!r}: bad address {text_ip!r}"
            ) from None
        if address.version != version:
            raise ValidationError(
                f"invalid PROXY v1 header {line!r}: {text_ip!r} is not {parts[1]}"
            )
        addresses.append(normalize_ip(text_ip) or text_ip)
    return ProxyInfo(addresses[0], _port(parts[4], line), addresses[1], _port(parts[5], line))


def proxy_v2_length(header: bytes) -> int:
    """Total header length announced by the first 16 bytes of a v2 header."""
    if len(header) < PROXY_V2_HEADER_LEN or not header.startswith(PROXY_V2_SIGNATURE):
        raise ValidationError("invalid PROXY v2 header: bad signature")
    announced: int = struct.unpack_from("!H", header, 14)[0]
    return PROXY_V2_HEADER_LEN + announced


def parse_proxy_v2(header: bytes) -> ProxyInfo | None:
    """Parse a complete binary v2 header (16 bytes + announced length).

    LOCAL command, or family UNSPEC / UNIX: None (use the peer). TLVs are ignored.
    """
    total = proxy_v2_length(header)
    if len(header) != total:
        raise ValidationError(
            f"invalid PROXY v2 header: {len(header)} bytes, header announces {total}"
        )
    version, command = header[12] >> 4, header[12] & 0x0F
    if version != 2:
        raise ValidationError(f"invalid PROXY v2 header: version {version}")
    if command == 0x0:
        return None  # LOCAL: health check from the proxy itself
    if command != 0x1:
        raise ValidationError(f"invalid PROXY v2 header: command {command}")
    family, transport = header[13] >> 4, header[13] & 0x0F
    if transport not in (0x0, 0x1, 0x2):
        raise ValidationError(f"invalid PROXY v2 header: transport {transport}")
    body = header[PROXY_V2_HEADER_LEN:]
    if family == 0x1:  # AF_INET
        if len(body) < 12:
            raise ValidationError("invalid PROXY v2 header: short IPv4 address block")
        src, dst, src_port, dst_port = struct.unpack_from("!4s4sHH", body)
        return ProxyInfo(
            str(IPAddress(int.from_bytes(src, "big"), 4)),
            src_port,
            str(IPAddress(int.from_bytes(dst, "big"), 4)),
            dst_port,
        )
    if family == 0x2:  # AF_INET6
        if len(body) < 36:
            raise ValidationError("invalid PROXY v2 header: short IPv6 address block")
        src, dst, src_port, dst_port = struct.unpack_from("!16s16sHH", body)
        source = IPAddress(int.from_bytes(src, "big"), 6)
        target = IPAddress(int.from_bytes(dst, "big"), 6)
        return ProxyInfo(
            normalize_ip(str(source)) or str(source),
            src_port,
            normalize_ip(str(target)) or str(target),
            dst_port,
        )
    if family in (0x0, 0x3):  # UNSPEC, AF_UNIX: no IP to report
        return None
    raise ValidationError(f"invalid PROXY v2 header: address family {family}")
