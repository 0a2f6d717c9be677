"""`keybroker serve`: run the broker daemon (flags override the config file and defaults)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import click

from broker.cli.common import current_state
from broker.core import loop
from broker.core.settings import ANY_HOST, Listener, Settings, check_listeners, load_settings
from broker.state.sqlite import reset_state_file
from broker.state.store import IN_MEMORY, state_file
from keystore.sqlite.db import holds_database

logger = logging.getLogger(__name__)

DEMO_DEVICE = "demo-device"
DEMO_DASHBOARD = "demo-dashboard"
DEMO_PAYLOAD = '{"data":{"temp":21}}'


def _with_listener(settings: Settings, name: str, **fields: object) -> Settings:
    """Replace the fields of listener `name`, creating it when it does not exist."""
    listeners = list(settings.listeners)
    for index, listener in enumerate(listeners):
        if listener.name == name:
            listeners[index] = replace(listener, **fields)  # type: ignore[arg-type]
            break
    else:
        listeners.append(Listener(name, **fields))  # type: ignore[arg-type]
    return replace(settings, listeners=tuple(listeners))


def build_settings(
    config: Path | None,
    db: str | None,
    host: str | None,
    port: int | None,
    ws_port: int | None,
    tls_port: int | None,
    wss_port: int | None,
    certfile: str | None,
    keyfile: str | None,
    audit_log: Path | None,
    api_host: str | None = None,
    api_port: int | None = None,
    no_api: bool = False,
) -> Settings:
    settings = load_settings(config).with_db(db).with_overrides(
        audit_path=audit_log, api_host=api_host, api_port=api_port)
    if no_api:
        settings = replace(settings, api_enabled=False)
    if (tls_port is not None or wss_port is not None) and not (certfile and keyfile):
        raise click.UsageError("--tls-port/--wss-port need --certfile and --keyfile")
    if port is not None:
        settings = _with_listener(settings, "tcp", type="tcp", port=port)
    if ws_port is not None:
        settings = _with_listener(settings, "ws", type="ws", port=ws_port)
    if tls_port is not None:
        settings = _with_listener(settings, "tls", type="tcp", port=tls_port,
                                  certfile=certfile, keyfile=keyfile)
    if wss_port is not None:
        settings = _with_listener(settings, "wss", type="ws", port=wss_port,
                                  certfile=certfile, keyfile=keyfile)
    if host is not None:
        settings = replace(
            settings, listeners=tuple(replace(item, host=host) for item in settings.listeners)
        )
    check_listeners(settings)
    return settings


# --- start-up checks ---------------------------------------------------------------------

SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class NewKeystore:
    """A keystore this start creates, because none is at the configured path (often a
    mistyped --db): said loudly once the daemon is up; a start that fails (a port in use)
    removes it again with the files and folders made for it, so the next start still
    finds no keystore there and says so."""

    path: Path
    new_files: tuple[Path, ...]  # the keystore, the state file and their sidecars
    new_folders: tuple[Path, ...]  # deepest first

    def remove(self) -> None:
        for path in self.new_files:
            path.unlink(missing_ok=True)
        for folder in self.new_folders:
            with contextlib.suppress(OSError):  # not empty: something else lives there
                folder.rmdir()


def new_keystore(settings: Settings) -> NewKeystore | None:
    """The keystore file this start would create, or None (one is there, or PostgreSQL).
    A file that is not a keystore is refused here, before anything is made."""
    if settings.db_url is not None or str(settings.db_path) == IN_MEMORY:
        return None
    path = settings.db_path.absolute()
    if holds_database(str(path)):
        return None
    bases = [path] + ([state_file(settings)] if settings.persistence else [])
    files = [Path(f"{base}{suffix}") for base in bases for suffix in ("", *SQLITE_SIDECARS)]
    folders = {folder for base in bases for folder in base.parents if not folder.exists()}
    return NewKeystore(path, tuple(item for item in files if not item.exists()),
                       tuple(sorted(folders, key=lambda item: len(item.parts), reverse=True)))


# --- the first-run demo --------------------------------------------------------------------


async def create_demo_if_empty(settings: Settings) -> tuple[str, str] | None:
    """On an empty keystore: a demo device, a demo dashboard and one key for both, so the
    dashboard can watch the device's state. Returns (key, secret)."""
    async with settings.open_keystore() as ks:
        if await ks.count_devices() or await ks.count_keys():
            return None
        await ks.add_device(DEMO_DEVICE, name="Demo device", tags=[("kind", "demo")])
        await ks.add_device(DEMO_DASHBOARD, name="Demo dashboard", tags=[("kind", "demo")])
        key, secret = await ks.create_key(
            name="demo", description="created by keybroker serve --demo-if-empty",
            device_ids=[DEMO_DEVICE, DEMO_DASHBOARD])
        return key.key, secret


def _tool(name: str) -> str:
    """A command of this Python environment (amqtt's clients sit next to keybroker), as a
    path a shell finds even when the environment is not activated."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        return name
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def demo_commands(settings: Settings, key: str, secret: str, host: str,
                  port: int) -> dict[str, tuple[str, str]]:
    """Shell commands for the demo round trip: tool -> (subscriber, publisher). amqtt's
    clients log at INFO on stderr, with no option to quiet them: 2>/dev/null keeps the
    terminal to the message (each one printed on its own line)."""
    topic = f"{settings.device_prefix}/{DEMO_DEVICE}/state"
    q = shlex.quote
    url_host = f"[{host}]" if ":" in host else host
    url = f"mqtt://{key}:{secret}@{url_host}:{port}"
    return {
        "amqtt": (
            f"{q(_tool('amqtt_sub'))} --url {q(url)} -i {DEMO_DASHBOARD} --clean-session"
            f" -t {q(topic)} 2>/dev/null",
            f"{q(_tool('amqtt_pub'))} --url {q(url)} -i {DEMO_DEVICE} --clean-session"
            f" -t {q(topic)} -m {q(DEMO_PAYLOAD)} 2>/dev/null",
        ),
        "mosquitto": (
            f"mosquitto_sub -h {host} -p {port} -i {DEMO_DASHBOARD} -u {key} -P {q(secret)}"
            f" -t {q(topic)} -v",
            f"mosquitto_pub -h {host} -p {port} -i {DEMO_DEVICE} -u {key} -P {q(secret)}"
            f" -t {q(topic)} -m {q(DEMO_PAYLOAD)}",
        ),
    }


def demo_instructions(settings: Settings, key: str, secret: str, host: str, port: int) -> str:
    commands = demo_commands(settings, key, secret, host, port)
    amqtt_sub, amqtt_pub = commands["amqtt"]
    mosquitto_sub, mosquitto_pub = commands["mosquitto"]
    return "\n".join([
        "",
        f"The keystore was empty: created devices '{DEMO_DEVICE}' and '{DEMO_DASHBOARD}'"
        " and one access key for both.",
        f"  key:    {key}",
        f"  secret: {secret}",
        "  The secret is shown this once; it is not stored and cannot be recovered.",
        "",
        "Try a round trip: in one terminal the dashboard watches the device's state,",
        "in another the device publishes it (the dashboard prints the message).",
        "With amqtt's clients (installed with keybroker; 2>/dev/null hides their INFO logging,",
        "drop it to see why one fails):",
        f"  {amqtt_sub}",
        f"  {amqtt_pub}",
        "Or with mosquitto-clients:",
        f"  {mosquitto_sub}",
        f"  {mosquitto_pub}",
        "",
    ])


def _client_host(listener: Listener) -> str:
    """Where a client on this machine reaches a listener."""
    return "127.0.0.1" if listener.host in (ANY_HOST, "", "::") else listener.host


# --- the command ---------------------------------------------------------------------------


@click.command()
@click.option("--config", type=click.Path(path_type=Path),
              help="TOML config (default: `keybroker --config`, $KEYBROKER_CONFIG, or none).")
@click.option("--host", help="Bind every listener to this address.")
@click.option("--port", type=click.IntRange(0, 65535), help="MQTT/TCP port (0 = any free port).")
@click.option("--ws-port", type=click.IntRange(0, 65535), help="WebSocket port.")
@click.option("--tls-port", type=click.IntRange(0, 65535), help="MQTT over TLS port.")
@click.option("--wss-port", type=click.IntRange(0, 65535), help="WebSocket over TLS port.")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False), help="TLS certificate.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), help="TLS private key.")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Append the JSON-lines audit trail here.")
@click.option("--api-host", help="Bind the HTTP API to this address (default 127.0.0.1).")
@click.option("--api-port", type=click.IntRange(0, 65535),
              help="HTTP API port (default 8080; 0 = any free port).")
@click.option("--no-api", is_flag=True, help="Do not serve the HTTP API.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--demo-if-empty", is_flag=True,
              help="On an empty keystore, create demo devices and a key and print them once.")
@click.option("--reset-state", is_flag=True,
              help="Move the broker state file aside (kept as <file>.<time>.bak) and start "
                   "with no retained messages and no persistent sessions.")
def serve(config: Path | None, host: str | None, port: int | None, ws_port: int | None,
          tls_port: int | None, wss_port: int | None, certfile: str | None,
          keyfile: str | None, audit_log: Path | None, api_host: str | None,
          api_port: int | None, no_api: bool, log_level: str, demo_if_empty: bool,
          reset_state: bool) -> None:
    """Run the MQTT broker (and its HTTP API) until SIGINT/SIGTERM."""
    # The daemon's modules (amqtt, aiohttp, the console...) load here, not with the CLI.
    from broker.daemon.server import BrokerServer, tune_garbage_collector

    state = current_state()
    settings = build_settings(config or state.config, state.db_override, host, port, ws_port,
                              tls_port, wss_port, certfile, keyfile, audit_log, api_host,
                              api_port, no_api)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs every connection at INFO, and transitions / websockets their internals:
    # keep the daemon's log about keybroker.
    for chatty in ("amqtt", "transitions", "websockets"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    fresh = new_keystore(settings)
    if settings.db_url is None:
        settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    if settings.persistence:  # beside the keystore file, which a PostgreSQL URL has not
        state_file(settings).parent.mkdir(parents=True, exist_ok=True)
    if reset_state:
        path = state_file(settings)
        backup = reset_state_file(path)
        click.echo(f"broker state {path} moved to {backup}: starting with an empty state"
                   if backup is not None else f"no broker state file {path} to reset", err=True)
    created: tuple[str, str] | None = None
    up = False

    def started(server: BrokerServer) -> None:
        nonlocal up
        up = True
        tune_garbage_collector()  # this process is the daemon's alone
        if fresh is not None:
            logger.warning("created a new empty keystore at %s: there was none (check --db, "
                           "KEYBROKER_DB or [keystore] path if you expected one)", fresh.path)
        if created is not None:  # printed once the port is known (port 0 = any free port)
            plain = [item for item in settings.listeners if item.type == "tcp" and not item.tls]
            if plain:
                click.echo(demo_instructions(settings, *created, _client_host(plain[0]),
                                             server.port(plain[0].name)))
            else:
                click.echo(f"demo key {created[0]} (secret {created[1]}): "
                           "no plain MQTT listener to print example commands for")

    try:
        if demo_if_empty:
            created = asyncio.run(create_demo_if_empty(settings))
        loop.run(lambda: BrokerServer(settings).serve(on_started=started))
    except BaseException:
        if fresh is not None and not up:
            fresh.remove()
        raise
