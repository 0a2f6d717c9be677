"""IP addresses and networks: the one parser every address goes through (docs/access.md).

* ``parse_ip``: a client address as text -> netaddr IPAddress, or None when it is not
  one. Brackets (``[2001:db8::1]``) are accepted; zone ids (``fe80::1%eth0``) are not
  (they name a local interface, never a remote client); IPv4-mapped IPv6
  (``::ffff:1.2.3.4``) is folded to IPv4 so it matches IPv4 rules.
* ``network_set``: configured IPs/CIDRs -> an IPSet in which an IPv4-mapped IPv6 network
  also stands for its IPv4 form (client addresses are folded before lookup).
* ``source_of``: what per-source limits count: an IPv4 address, or an IPv6 /64.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from netaddr import AddrFormatError, IPAddress, IPNetwork, IPSet

from keystore.errors import ValidationError
from keystore.validation import validate_address


def parse_ip(text: object) -> IPAddress | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # "[2001:db8::1]" as written in URLs and some headers
    if "%" in text:
        return None  # zone ids name a local interface: never a remote client's address
    try:
        address = IPAddress(text)  # netaddr >= 1.0: strict inet_pton forms only
    except (AddrFormatError, ValueError, TypeError):
        return None
    if address.version == 6 and address.is_ipv4_mapped():
        return address.ipv4()
    return address


@lru_cache(maxsize=65_536)
def normalize_ip(text: str) -> str | None:
    """Canonical text of an IP address (see ``parse_ip``); invalid -> None.
    Cached: every CONNECT normalises its peer, and peers repeat."""
    address = parse_ip(text)
    return None if address is None else str(address)


def network_set(cidrs: Iterable[str], what: str = "address") -> IPSet:
    """An IPSet of IPs/CIDRs, each checked by the keystore's one rule
    (``validate_address``: a CIDR with host bits set is refused); IPv4-mapped IPv6
    networks (``::ffff:a.b.c.d/n``, n >= 96) are added in their IPv4 form too.
    ValidationError names a bad entry and what it is."""
    networks: list[IPNetwork] = []
    for text in cidrs:
        try:
            network = IPNetwork(validate_address(text))
        except ValidationError as exc:
            raise ValidationError(f"{what}: {exc}") from None
        networks.append(network)
        if network.version == 6 and network.prefixlen >= 96 and network.ip.is_ipv4_mapped():
            networks.append(network.ipv4())
    return IPSet(networks)


@lru_cache(maxsize=4096)
def compile_addresses(addresses: tuple[str, ...]) -> IPSet:
    """A key's address list as an IPSet, built once per distinct list. Shared: never
    mutate the returned set."""
    return network_set(addresses)


def contains(networks: IPSet, ip: str) -> bool:
    address = parse_ip(ip)
    return address is not None and address in networks


def source_of(ip: str) -> str:
    """What per-source limits count per: the IPv4 address, or the IPv6 /64 (one host can
    hold a whole /64 and would otherwise get a fresh address for every attempt)."""
    if ":" not in ip:
        return ip
    try:
        return str(IPNetwork(f"{ip}/64").cidr)
    except (AddrFormatError, ValueError):
        return ip


class TrustedProxies:
    """Proxy CIDRs compiled once (IPv4-mapped peers match IPv4 entries)."""

    __slots__ = ("cidrs", "_set")

    def __init__(self, cidrs: Iterable[str]) -> None:
        self._set = network_set(cidrs, "trusted proxy")
        self.cidrs: tuple[str, ...] = tuple(str(n) for n in self._set.iter_cidrs())

    def __repr__(self) -> str:
        return f"TrustedProxies({list(self.cidrs)!r})"

    def contains(self, ip: str) -> bool:
        return contains(self._set, ip)
