"""`keybroker serve`: run the broker daemon (flags override the config file and defaults)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import click

from broker.cli_common import current_state
from broker.server import BrokerServer
from broker.settings import ANY_HOST, Listener, Settings, check_listeners, load_settings
from keystore import KeyStore

DEMO_DEVICE = "demo-device"


def _with_listener(settings: Settings, name: str, **fields: object) -> Settings:
    """Replace the fields of listener `name`, creating it when it does not exist."""
    listeners = list(settings.listeners)
    for index, listener in enumerate(listeners):
        if listener.name == name:
            listeners[index] = replace(listener, **fields)  # type: ignore[arg-type]
            break
    else:
        base = {"name": name, "type": "tcp", "host": ANY_HOST, "port": 0}
        base.update(fields)
        listeners.append(Listener(**base))  # type: ignore[arg-type]
    return replace(settings, listeners=tuple(listeners))


def build_settings(
    config: Path | None,
    db: Path | None,
    host: str | None,
    port: int | None,
    ws_port: int | None,
    tls_port: int | None,
    wss_port: int | None,
    certfile: str | None,
    keyfile: str | None,
    audit_log: Path | None,
) -> Settings:
    settings = load_settings(config).with_overrides(db_path=db, audit_path=audit_log)
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


async def create_demo_if_empty(settings: Settings) -> tuple[str, str] | None:
    """On an empty keystore: one demo device and a key scoped to it. Returns (key, secret)."""
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    async with KeyStore.open(settings.db_path, device_prefix=settings.device_prefix,
                             max_keys=settings.max_keys) as ks:
        if await ks.count_devices() or await ks.count_keys():
            return None
        await ks.add_device(DEMO_DEVICE, name="Demo device", tags=[("kind", "demo")])
        key, secret = await ks.create_key(name="demo", description="created by scripts/serve",
                                          device_ids=[DEMO_DEVICE])
        return key.key, secret


def demo_instructions(settings: Settings, key: str, secret: str, port: int) -> str:
    topic = f"{settings.device_prefix}/{DEMO_DEVICE}"
    return "\n".join([
        "",
        "The keystore was empty: created device 'demo-device' and an access key for it.",
        f"  key:    {key}",
        f"  secret: {secret}",
        "  The secret is shown this once; it is not stored and cannot be recovered.",
        "",
        "Try it (mosquitto-clients), in two terminals:",
        f"  mosquitto_sub -h 127.0.0.1 -p {port} -i {DEMO_DEVICE} -u {key} -P '{secret}'"
        f" -t '{topic}/command' -v",
        f"  mosquitto_pub -h 127.0.0.1 -p {port} -i {DEMO_DEVICE} -u {key} -P '{secret}'"
        f" -t '{topic}/state' -m '{{\"data\":{{\"temp\":21}}}}'",
        "",
    ])


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
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--demo-if-empty", is_flag=True,
              help="On an empty keystore, create a demo device and key and print them once.")
def serve(config: Path | None, host: str | None, port: int | None, ws_port: int | None,
          tls_port: int | None, wss_port: int | None, certfile: str | None,
          keyfile: str | None, audit_log: Path | None, log_level: str,
          demo_if_empty: bool) -> None:
    """Run the MQTT broker until SIGINT/SIGTERM."""
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # amqtt logs every connection at INFO, and transitions / websockets their internals:
    # keep the daemon's log about keybroker.
    for chatty in ("amqtt", "transitions", "websockets"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    state = current_state()
    settings = build_settings(config or state.config, state.db_override, host, port, ws_port,
                              tls_port, wss_port, certfile, keyfile, audit_log)
    created = asyncio.run(create_demo_if_empty(settings)) if demo_if_empty else None

    def started(server: BrokerServer) -> None:
        if created is not None:  # printed once the port is known (port 0 = any free port)
            plain = [name for name, item in ((i.name, i) for i in settings.listeners)
                     if item.type == "tcp" and not item.tls]
            port = server.port(plain[0]) if plain else 1883
            click.echo(demo_instructions(settings, *created, port))

    asyncio.run(BrokerServer(settings).serve(on_started=started))
