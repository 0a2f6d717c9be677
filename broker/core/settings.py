"""One frozen Settings object: defaults in code, an optional TOML file, then CLI flags.

``Settings`` is the single source of every default. ``load_settings`` starts from it and
applies the config file, whose keys are checked (an unknown key, a wrong type or a bad
value is a ``ConfigError`` naming the key). Without a file the defaults apply as they are.
The documented example config (``broker/keybroker.example.toml``, printed by
``keybroker config example``) states every default; a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from broker.core.environment import ENV_CONFIG
from broker.policy.guard import GuardSettings
from keystore import (
    DEFAULT_CHANGE_POLL_INTERVAL,
    DEFAULT_DEVICE_PREFIX,
    DEFAULT_POOL_SIZE,
    DEFAULT_STATEMENT_TIMEOUT,
    KeyStore,
)
from keystore.errors import ConfigError, ValidationError
from keystore.location import check_postgres_url, is_url, redact
from keystore.store import Opener
from keystore.validation import validate_address

EXAMPLE_CONFIG = "keybroker.example.toml"  # package data of `broker`


# A broker listens on every interface unless told otherwise.
ANY_HOST = "0.0.0.0"  # noqa: S104


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    type: str = "tcp"  # or "ws"
    host: str = ANY_HOST
    port: int = 0  # 0 = any free port
    certfile: str | None = None
    keyfile: str | None = None
    proxy_protocol: bool = False

    @property
    def tls(self) -> bool:
        return self.certfile is not None


DEFAULT_LISTENERS = (
    Listener(name="tcp", type="tcp", host=ANY_HOST, port=1883),
    Listener(name="ws", type="ws", host=ANY_HOST, port=8083),
)


@dataclass(frozen=True, slots=True)
class Settings:
    db_path: Path = Path("data/keybroker.db")
    # A postgresql:// URL: the keystore is that PostgreSQL database instead of db_path.
    db_url: str | None = None
    db_pool_size: int = DEFAULT_POOL_SIZE  # connections to PostgreSQL at most (per process)
    db_statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT  # seconds a statement may run
    max_keys: int = 0
    max_devices: int = 0
    device_prefix: str = DEFAULT_DEVICE_PREFIX
    denied_publish: str = "drop"
    # MQTT 5 (docs/mqtt5.md): what the broker announces in CONNACK and holds clients to.
    receive_maximum: int = 100  # QoS 1/2 PUBLISHes a client may leave unacknowledged
    topic_alias_maximum: int = 16  # Topic Aliases a client may set (0: none)
    max_keepalive: int = 0  # Server Keep Alive when a client asks for more (0: the client's)
    reason_strings: bool = True  # refusals name their rule class (never a key's lists)
    shared_subscriptions: bool = True  # $share/GROUP/FILTER (MQTT 3.1.1 clients too)
    wildcard_subscriptions: bool = True
    listeners: tuple[Listener, ...] = DEFAULT_LISTENERS
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_packet_size: int = 262144
    connect_timeout: float = 10.0
    keepalive_factor: float = 1.5
    packet_timeout: float = 10.0
    max_connections: int = 10_000
    max_subscriptions: int = 1_000
    # Subscription bytes (the filter and ~400 bytes per level of it in the trie): per
    # session, per access key (its sessions together), per application.
    max_subscription_bytes: int = 2 * 1024 * 1024
    max_subscription_bytes_per_key: int = 64 * 1024 * 1024
    max_subscription_bytes_per_app: int = 256 * 1024 * 1024
    max_queued_messages: int = 1_000
    max_inflight_messages: int = 100
    max_session_bytes: int = 256 * 1024
    # Seconds a live session may stay past its bounds draining nothing before it is
    # disconnected as a slow consumer (its publishers wait meanwhile: broker.mqtt.flow).
    slow_consumer_timeout: float = 10.0
    max_publish_rate: float = 0.0  # PUBLISH per second per connection; 0 = no limit
    max_retained_messages: int = 100_000
    max_retained_bytes: int = 256 * 1024 * 1024
    max_retained_per_key: int = 1_000
    max_retained_bytes_per_key: int = 16 * 1024 * 1024
    max_retained_per_app: int = 10_000
    max_retained_bytes_per_app: int = 64 * 1024 * 1024
    device_retained_reserve: int = 8
    device_retained_reserve_bytes: int = 64 * 1024
    # The devices' reserves of one application, all together.
    max_retained_reserve_per_app: int = 100_000
    max_retained_reserve_bytes_per_app: int = 64 * 1024 * 1024
    max_connections_per_source: int = 1_000
    max_unauthenticated_per_source: int = 32
    session_expiry: int = 86_400  # seconds a disconnected persistent session is kept; 0 = forever
    max_topic_length: int = 1_024
    max_topic_levels: int = 32
    audit_path: Path | None = None
    guard: GuardSettings = GuardSettings()
    change_poll_interval: float = DEFAULT_CHANGE_POLL_INTERVAL
    change_retention: float = 86_400.0  # seconds consumed change-feed rows are kept
    # Broker state (retained messages, persistent sessions) kept across restarts.
    persistence: bool = True
    state_path: Path | None = None  # None: beside the keystore, <name>.state.db
    flush_interval: float = 1.0  # seconds between two write-behind flushes
    persistence_sync: bool = False  # QoS 1/2 acknowledged only once saved
    # The HTTP API (docs/api.md), served by the daemon on its own listener.
    api_enabled: bool = True
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    api_certfile: Path | None = None
    api_keyfile: Path | None = None
    api_console: bool = True  # the web console at /console (docs/console.md)
    api_metrics: bool = True  # GET /metrics, the loop probe (docs/observability.md)
    api_metrics_auth: bool = False  # GET /metrics needs a token with metrics.get
    api_cors_origins: tuple[str, ...] = ()  # origins allowed by CORS; none = CORS off
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto the API believes. None by
    # default: the API listens on loopback, where every local process would be "trusted".
    api_trusted_proxies: tuple[str, ...] = ()
    api_max_connections: int = 1_000  # open HTTP connections; 0 = no limit
    api_max_connections_per_source: int = 64  # per TCP peer (IPv4 / IPv6 /64); 0 = none
    api_request_timeout: float = 10.0  # seconds a connection may sit without a request
    api_device_token_ttl: int = 86_400  # seconds, when POST /auth/device gives no tokenTTL
    api_max_device_token_ttl: int = 30 * 86_400
    # `keybroker authsvc` (docs/cluster.md): the access-key service of a RabbitMQ or EMQX
    # cluster. Its HTTP listener, and the addresses allowed to ask (the engine's nodes).
    authsvc_host: str = "127.0.0.1"
    authsvc_port: int = 8081
    authsvc_allowed_peers: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    authsvc_max_connections: int = 4_096  # open HTTP connections; 0 = no limit
    # Seconds RabbitMQ's admission request (/auth/vhost) may follow the /auth/user request
    # that checked the same client id's secret.
    authsvc_admission_window: float = 10.0
    # RabbitMQ: the exchange its MQTT plugin publishes to, and its management API (kicks
    # on revocation, stale subscriptions dropped); no URL = neither.
    rabbitmq_exchange: str = "amq.topic"
    rabbitmq_api: tuple[str, ...] = ()
    rabbitmq_user: str = ""
    rabbitmq_password_file: Path | None = None
    # EMQX: the one application it serves, and its REST API (kicks).
    emqx_application: str = "default"
    emqx_api: tuple[str, ...] = ()
    emqx_api_key: str = ""
    emqx_api_secret_file: Path | None = None

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_db(self, db: str | os.PathLike[str] | None) -> Settings:
        """``--db`` / KEYBROKER_DB: a postgresql:// URL, or a plain path (an SQLite file);
        either replaces both [keystore] url and path."""
        if db is None:
            return self
        text = os.fspath(db)
        if is_url(text):
            return replace(self, db_url=check_postgres_url(text))
        return replace(self, db_path=Path(text).expanduser(), db_url=None)

    @property
    def keystore_target(self) -> str:
        """What KeyStore.open is given: the URL if one is set, else the file path."""
        return self.db_url if self.db_url is not None else str(self.db_path)

    @property
    def keystore_shown(self) -> str:
        """The keystore as named to operators: an absolute path, or the URL without its
        password."""
        return redact(self.db_url) if self.db_url is not None else str(self.db_path.absolute())

    def open_keystore(self, *, create: bool = True) -> Opener:
        """``KeyStore.open`` on this keystore with its settings (``async with`` it);
        ``create=False`` for a command that must not make a new one."""
        return KeyStore.open(self.keystore_target, device_prefix=self.device_prefix,
                             max_keys=self.max_keys, max_devices=self.max_devices,
                             pool_size=self.db_pool_size,
                             statement_timeout=self.db_statement_timeout, create=create)


# Where a field lives in the TOML file: (section, key). Every other field is a
# [limits] key of its own name; `listeners` is [listeners.NAME], `guard` is [security].
PLACES: dict[str, tuple[str, str]] = {
    "db_path": ("keystore", "path"),
    "db_url": ("keystore", "url"),
    "db_pool_size": ("keystore", "pool_size"),
    "db_statement_timeout": ("keystore", "statement_timeout"),
    "max_keys": ("keystore", "max_keys"),
    "max_devices": ("keystore", "max_devices"),
    "device_prefix": ("mqtt", "device_prefix"),
    "denied_publish": ("mqtt", "denied_publish"),
    "receive_maximum": ("mqtt", "receive_maximum"),
    "topic_alias_maximum": ("mqtt", "topic_alias_maximum"),
    "max_keepalive": ("mqtt", "max_keepalive"),
    "reason_strings": ("mqtt", "reason_strings"),
    "shared_subscriptions": ("mqtt", "shared_subscriptions"),
    "wildcard_subscriptions": ("mqtt", "wildcard_subscriptions"),
    "trusted_proxies": ("network", "trusted_proxies"),
    "audit_path": ("audit", "path"),
    "persistence": ("persistence", "enabled"),
    "state_path": ("persistence", "path"),
    "flush_interval": ("persistence", "flush_interval"),
    "persistence_sync": ("persistence", "sync"),
    "api_enabled": ("api", "enabled"),
    "api_host": ("api", "host"),
    "api_port": ("api", "port"),
    "api_certfile": ("api", "certfile"),
    "api_keyfile": ("api", "keyfile"),
    "api_console": ("api", "console"),
    "api_metrics": ("api", "metrics"),
    "api_metrics_auth": ("api", "metrics_auth"),
    "api_cors_origins": ("api", "cors_origins"),
    "api_trusted_proxies": ("api", "trusted_proxies"),
    "api_max_connections": ("api", "max_connections"),
    "api_max_connections_per_source": ("api", "max_connections_per_source"),
    "api_request_timeout": ("api", "request_timeout"),
    "api_device_token_ttl": ("api", "device_token_ttl"),
    "api_max_device_token_ttl": ("api", "max_device_token_ttl"),
    "authsvc_host": ("authsvc", "host"),
    "authsvc_port": ("authsvc", "port"),
    "authsvc_allowed_peers": ("authsvc", "allowed_peers"),
    "authsvc_max_connections": ("authsvc", "max_connections"),
    "authsvc_admission_window": ("authsvc", "admission_window"),
    "rabbitmq_exchange": ("rabbitmq", "exchange"),
    "rabbitmq_api": ("rabbitmq", "api"),
    "rabbitmq_user": ("rabbitmq", "user"),
    "rabbitmq_password_file": ("rabbitmq", "password_file"),
    "emqx_application": ("emqx", "application"),
    "emqx_api": ("emqx", "api"),
    "emqx_api_key": ("emqx", "api_key"),
    "emqx_api_secret_file": ("emqx", "api_secret_file"),
}
SECTIONS = ("keystore", "mqtt", "listeners", "network", "limits", "audit", "security",
            "persistence", "api", "authsvc", "rabbitmq", "emqx")
CIDR_LISTS = frozenset({"trusted_proxies", "api_trusted_proxies", "authsvc_allowed_peers"})
URL_LISTS = frozenset({"rabbitmq_api", "emqx_api"})
CHOICES = {"denied_publish": ("drop", "disconnect"), "type": ("tcp", "ws")}
# 0 makes no sense for these
POSITIVE = frozenset({"keepalive_factor", "change_poll_interval", "flush_interval",
                      "api_device_token_ttl", "api_max_device_token_ttl",
                      "api_request_timeout", "db_pool_size", "db_statement_timeout",
                      "slow_consumer_timeout", "authsvc_admission_window"})
PORTS = frozenset({"port", "api_port", "authsvc_port"})  # "port": a listener's
MAX_PORT = 65535
LISTENER_KEYS = ("type", "host", "port", "certfile", "keyfile", "proxy_protocol", "enabled")


def place(name: str) -> tuple[str, str]:
    """The (section, key) of a Settings field other than `listeners` and `guard`."""
    return PLACES.get(name, ("limits", name))


def config_keys() -> set[tuple[str, str]]:
    """Every (section, key) the config file may hold, listeners' tables excepted."""
    out = {place(f.name) for f in fields(Settings) if f.name not in ("listeners", "guard")}
    return out | {("security", f.name) for f in fields(GuardSettings)}


def did_you_mean(key: str, here: Iterable[str], elsewhere: Mapping[str, str] | None = None,
                 ) -> str:
    """" (did you mean 'KEY'?)" naming the known key of this table closest to a mistyped
    one, else the closest of ``elsewhere`` (key -> its section: a key put in the wrong
    table, " (did you mean [mqtt] device_prefix?)"); "" when none is close."""
    close = difflib.get_close_matches(key, list(here), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    close = difflib.get_close_matches(key, list(elsewhere or {}), n=1)
    return f" (did you mean [{(elsewhere or {})[close[0]]}] {close[0]}?)" if close else ""


# --- reading values ------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _typed(where: str, hint: Any, value: Any, base: Path | None) -> Any:
    """``value`` from TOML as the Python type ``hint``, or a ConfigError naming ``where``."""

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, not {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong("a number")
        return float(value)
    if hint is str or hint == str | None:
        if not isinstance(value, str):
            raise wrong("a string")
        return value if value or hint is str else None
    if hint is Path or hint == Path | None:
        if not isinstance(value, str):
            raise wrong("a path string")
        if not value:
            if hint is Path:
                raise wrong("a path")
            return None
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong("a list of strings")
        return tuple(value)
    raise AssertionError(f"{where}: no TOML reading for {hint!r}")  # a new field type


def _checked(where: str, name: str, value: Any) -> Any:
    """Value rules beyond the type: choices, non-negative numbers, CIDRs."""
    if name in CHOICES and value not in CHOICES[name]:
        allowed = " or ".join(repr(c) for c in CHOICES[name])
        raise ConfigError(f"{where}: invalid value {value!r}: must be {allowed}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if name in PORTS and value > MAX_PORT:
            raise ConfigError(f"{where}: invalid value {value!r}: must be 0-{MAX_PORT}")
        if name in POSITIVE and value <= 0:
            raise ConfigError(f"{where}: invalid value {value!r}: must be more than 0")
        if value < 0:
            raise ConfigError(f"{where}: invalid value {value!r}: must be 0 or more")
    if name in CIDR_LISTS:
        return tuple(_cidr(where, item) for item in value)
    if name in URL_LISTS:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{where}: invalid URL {url!r}: must start with http:// "
                                  "or https://")
    if name == "db_url" and value is not None:
        try:
            return check_postgres_url(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return value


def _cidr(where: str, value: str) -> str:
    try:
        return validate_address(value)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table, not {value!r}")
    return value


def _listener(name: str, raw: Any, base: Path | None) -> Listener | None:
    """One [listeners.NAME] table; None when it says enabled = false."""
    where = f"[listeners.{name}]"
    raw = _table(where, raw)
    unknown = sorted(set(raw) - set(LISTENER_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}"
                          f"{did_you_mean(unknown[0], LISTENER_KEYS)}")
    hints = _hints(Listener)
    values: dict[str, Any] = {"name": name}
    for key in ("type", "host", "port", "proxy_protocol"):
        if key in raw:
            values[key] = _checked(f"{where} {key}", key, _typed(f"{where} {key}", hints[key],
                                                                  raw[key], None))
    for key in ("certfile", "keyfile"):
        if key in raw:
            path = _typed(f"{where} {key}", Path | None, raw[key], base)
            values[key] = str(path) if path is not None else None
    if not _typed(f"{where} enabled", bool, raw.get("enabled", True), None):
        return None
    listener = Listener(**values)
    if (listener.certfile is None) != (listener.keyfile is None):
        raise ConfigError(f"{where}: certfile and keyfile go together")
    return listener


def settings_from_toml(raw: dict[str, Any], base: Path | None = None) -> Settings:
    """Settings from a parsed config file; relative paths are joined to ``base`` (the
    file's directory). Keys the file leaves out keep their default."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], SECTIONS, n=1)
        hint = f" (did you mean [{close[0]}]?)" if close else ""
        raise ConfigError(f"unknown section [{unknown[0]}]{hint} (expected "
                          f"{', '.join(SECTIONS)})")
    sections = {name: _table(f"[{name}]", raw.get(name, {})) for name in SECTIONS}
    known = config_keys()
    for section in SECTIONS:
        if section == "listeners":
            continue
        for key in sections[section]:
            if (section, key) not in known:
                here = [name for where, name in known if where == section]
                elsewhere = {name: where for where, name in known if where != section}
                raise ConfigError(f"[{section}]: unknown key {key!r}"
                                  f"{did_you_mean(key, here, elsewhere)}")
    hints = _hints(Settings)
    changes: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name in ("listeners", "guard"):
            continue
        section, key = place(f.name)
        if key in sections[section]:
            where = f"[{section}] {key}"
            value = _typed(where, hints[f.name], sections[section][key], base)
            changes[f.name] = _checked(where, f.name, value)
    if "listeners" in raw:  # the file's listeners replace the default ones
        listeners = (_listener(n, spec, base) for n, spec in sections["listeners"].items())
        changes["listeners"] = tuple(item for item in listeners if item is not None)
    guard_hints, security = _hints(GuardSettings), sections["security"]
    changes["guard"] = GuardSettings(**{
        key: _checked(f"[security] {key}", key,
                      _typed(f"[security] {key}", guard_hints[key], value, None))
        for key, value in security.items()
    })
    settings = Settings(**changes)
    check_api(settings)
    check_authsvc(settings)
    return settings


def check_api(settings: Settings) -> None:
    """Rules between [api] values (each value's own type and range is checked on reading)."""
    if (settings.api_certfile is None) != (settings.api_keyfile is None):
        raise ConfigError("[api]: certfile and keyfile go together")
    if settings.api_device_token_ttl > settings.api_max_device_token_ttl:
        raise ConfigError(
            f"[api] device_token_ttl: invalid value {settings.api_device_token_ttl!r}: "
            f"more than max_device_token_ttl ({settings.api_max_device_token_ttl})")
    for origin in settings.api_cors_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"[api] cors_origins: invalid origin {origin!r}: "
                              "must start with http:// or https://")


def check_authsvc(settings: Settings) -> None:
    """Rules between [authsvc], [rabbitmq] and [emqx] values."""
    if settings.rabbitmq_api and not (settings.rabbitmq_user and settings.rabbitmq_password_file):
        raise ConfigError("[rabbitmq] api: needs user and password_file (a management user "
                          "with the administrator tag)")
    if settings.emqx_api and not (settings.emqx_api_key and settings.emqx_api_secret_file):
        raise ConfigError("[emqx] api: needs api_key and api_secret_file (an EMQX API key)")


def config_path(config: Path | str | None = None) -> Path | None:
    """The config file to read: ``config``, else $KEYBROKER_CONFIG, else none."""
    chosen = config or os.environ.get(ENV_CONFIG)
    return Path(chosen) if chosen else None


def load_settings(config: Path | str | None = None) -> Settings:
    """Defaults, overridden by the config file (``config`` or $KEYBROKER_CONFIG) if any.

    A config file that was named but cannot be read is an error, never a silent default.
    Relative paths in it are resolved against its directory."""
    path = config_path(config)
    if path is None:
        return Settings()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML: {exc}") from None
    try:
        return settings_from_toml(raw, base=path.absolute().parent)
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None


def check_listeners(settings: Settings) -> None:
    if not settings.listeners:
        raise ConfigError(
            "no listener enabled: add a [listeners.NAME] table to the config "
            "or give --port / --ws-port"
        )


# --- writing ----------------------------------------------------------------------------


def example_config() -> str:
    """The documented example config shipped with the package (every default)."""
    return resources.files("broker").joinpath(EXAMPLE_CONFIG).read_text(encoding="utf-8")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if value is None:
        return '""'
    if isinstance(value, Path):
        value = str(value.absolute())
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes are valid TOML escapes.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def settings_to_toml(settings: Settings) -> str:
    """The effective settings as a config file (paths absolute); it loads back equal,
    but for a password in the keystore URL, which is never written."""
    lines: list[str] = []
    by_section: dict[str, list[tuple[str, Any]]] = {}
    for f in fields(Settings):
        if f.name not in ("listeners", "guard"):
            section, key = place(f.name)
            value = getattr(settings, f.name)
            if f.name == "db_url" and value is not None:
                value = redact(value)
            by_section.setdefault(section, []).append((key, value))
    by_section["security"] = [(f.name, getattr(settings.guard, f.name))
                              for f in fields(GuardSettings)]
    for section in SECTIONS:
        if section == "listeners":
            # An empty [listeners] table means "no listener" (not the defaults).
            lines += ["[listeners]", ""] if not settings.listeners else []
            for item in settings.listeners:
                lines.append(f"[listeners.{item.name}]")
                for key in ("type", "host", "port", "certfile", "keyfile", "proxy_protocol"):
                    value = getattr(item, key)
                    if value is not None:
                        lines.append(f"{key} = {_toml(value)}")
                lines.append("")
            continue
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in by_section.get(section, [])]
        lines.append("")
    return "\n".join(lines)

