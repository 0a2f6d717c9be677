"""One frozen Settings object built from the TOML config, the environment and CLI flags."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netaddr import AddrFormatError, IPNetwork

from broker.guard import GuardSettings
from keystore.errors import ValidationError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "keybroker.toml"
ENV_DB = "KEYBROKER_DB"
ENV_CONFIG = "KEYBROKER_CONFIG"


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    type: str  # "tcp" or "ws"
    host: str
    port: int
    certfile: str | None = None
    keyfile: str | None = None
    proxy_protocol: bool = False

    @property
    def tls(self) -> bool:
        return self.certfile is not None


@dataclass(frozen=True, slots=True)
class Settings:
    db_path: Path = Path("data/keybroker.db")
    max_keys: int = 0
    device_prefix: str = "losant"
    denied_publish: str = "drop"
    listeners: tuple[Listener, ...] = ()
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_packet_size: int = 262144
    connect_timeout: float = 10.0
    keepalive_factor: float = 1.5
    packet_timeout: float = 10.0
    max_connections: int = 10_000
    max_subscriptions: int = 1_000
    max_queued_messages: int = 1_000
    max_inflight_messages: int = 100
    max_session_bytes: int = 256 * 1024
    max_publish_rate: float = 0.0  # PUBLISH per second per connection; 0 = no limit
    max_retained_messages: int = 100_000
    max_retained_bytes: int = 256 * 1024 * 1024
    max_retained_per_key: int = 1_000
    max_retained_bytes_per_key: int = 16 * 1024 * 1024
    device_retained_reserve: int = 8
    device_retained_reserve_bytes: int = 64 * 1024
    max_connections_per_source: int = 1_000
    max_unauthenticated_per_source: int = 32
    session_expiry: int = 86_400  # seconds a disconnected persistent session is kept; 0 = forever
    max_topic_length: int = 1_024
    max_topic_levels: int = 32
    audit_path: Path | None = None
    guard: GuardSettings = GuardSettings()
    change_poll_interval: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def _listener(name: str, raw: dict[str, Any]) -> Listener:
    kind = raw.get("type", "tcp")
    if kind not in ("tcp", "ws"):
        raise ValidationError(f"listener {name!r}: invalid type {kind!r}: must be 'tcp' or 'ws'")
    port = raw.get("port", 0)
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValidationError(f"listener {name!r}: invalid port {port!r}: must be 0-65535")
    certfile, keyfile = raw.get("certfile"), raw.get("keyfile")
    if (certfile is None) != (keyfile is None):
        raise ValidationError(f"listener {name!r}: certfile and keyfile go together")
    return Listener(
        name=name,
        type=kind,
        host=str(raw.get("host", "0.0.0.0")),  # noqa: S104 - a broker listens on all interfaces
        port=port,
        certfile=certfile,
        keyfile=keyfile,
        proxy_protocol=bool(raw.get("proxy_protocol", False)),
    )


def _check_proxies(values: list[str]) -> tuple[str, ...]:
    out = []
    for value in values:
        try:
            out.append(str(IPNetwork(value)))
        except (AddrFormatError, ValueError, TypeError) as exc:
            raise ValidationError(f"trusted_proxies: invalid CIDR {value!r}: {exc}") from None
    return tuple(out)


def load_settings(config: Path | str | None = None) -> Settings:
    """Read the TOML config (default: $KEYBROKER_CONFIG or config/keybroker.toml)."""
    path = Path(config or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValidationError(f"config file {str(path)!r}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"config file {str(path)!r}: {exc}") from None
    ks, mqtt = raw.get("keystore", {}), raw.get("mqtt", {})
    net, limits, audit = raw.get("network", {}), raw.get("limits", {}), raw.get("audit", {})
    security = raw.get("security", {})
    denied = mqtt.get("denied_publish", "drop")
    if denied not in ("drop", "disconnect"):
        raise ValidationError(
            f"mqtt.denied_publish: invalid value {denied!r}: must be 'drop' or 'disconnect'"
        )
    listeners = tuple(
        _listener(name, spec)
        for name, spec in raw.get("listeners", {}).items()
        if spec.get("enabled", True)
    )
    settings = Settings(
        db_path=Path(os.environ.get(ENV_DB) or ks.get("path", "data/keybroker.db")),
        max_keys=int(ks.get("max_keys", 0)),
        device_prefix=str(mqtt.get("device_prefix", "losant")),
        denied_publish=denied,
        listeners=listeners,
        trusted_proxies=_check_proxies(net.get("trusted_proxies", ["127.0.0.0/8", "::1/128"])),
        max_packet_size=int(limits.get("max_packet_size", 262144)),
        connect_timeout=float(limits.get("connect_timeout", 10)),
        keepalive_factor=float(limits.get("keepalive_factor", 1.5)),
        packet_timeout=float(limits.get("packet_timeout", 10)),
        max_connections=int(limits.get("max_connections", 10_000)),
        max_subscriptions=int(limits.get("max_subscriptions", 1_000)),
        max_queued_messages=int(limits.get("max_queued_messages", 1_000)),
        max_inflight_messages=int(limits.get("max_inflight_messages", 100)),
        max_session_bytes=int(limits.get("max_session_bytes", 256 * 1024)),
        max_publish_rate=float(limits.get("max_publish_rate", 0)),
        session_expiry=int(limits.get("session_expiry", 86_400)),
        max_retained_messages=int(limits.get("max_retained_messages", 100_000)),
        max_retained_bytes=int(limits.get("max_retained_bytes", 256 * 1024 * 1024)),
        max_retained_per_key=int(limits.get("max_retained_per_key", 1_000)),
        max_retained_bytes_per_key=int(
            limits.get("max_retained_bytes_per_key", 16 * 1024 * 1024)),
        device_retained_reserve=int(limits.get("device_retained_reserve", 8)),
        device_retained_reserve_bytes=int(limits.get("device_retained_reserve_bytes", 64 * 1024)),
        max_connections_per_source=int(limits.get("max_connections_per_source", 1_000)),
        max_unauthenticated_per_source=int(limits.get("max_unauthenticated_per_source", 32)),
        max_topic_length=int(limits.get("max_topic_length", 1_024)),
        max_topic_levels=int(limits.get("max_topic_levels", 32)),
        audit_path=Path(audit["path"]) if audit.get("path") else None,
        guard=GuardSettings(
            max_failures=int(security.get("max_failures", 20)),
            window=float(security.get("window", 60)),
            ban=float(security.get("ban", 60)),
            max_ban=float(security.get("max_ban", 3600)),
            max_tracked=int(security.get("max_tracked", 100_000)),
        ),
        change_poll_interval=float(limits.get("change_poll_interval", 0.25)),
        extra=raw,
    )
    return settings
