"""`keybroker authsvc`: run the access-key service of a RabbitMQ or EMQX cluster
(docs/cluster.md); flags override the config file and defaults."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from broker.cli.common import CREATE_HINT, current_state
from broker.core import loop
from broker.core.settings import load_settings
from keystore.errors import NotFoundError


@click.command()
@click.option("--config", type=click.Path(path_type=Path),
              help="TOML config (default: `keybroker --config`, $KEYBROKER_CONFIG, or none).")
@click.option("--host", help="Bind the service to this address (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Service port (default 8081; 0 = any free port).")
@click.option("--db", metavar="PATH|URL",
              help="Keystore: an SQLite file, or postgresql://user@host:port/dbname "
              "(overrides `keybroker --db`, $KEYBROKER_DB and the config).")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Append the JSON-lines audit trail here.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def authsvc(config: Path | None, host: str | None, port: int | None, db: str | None,
            audit_log: Path | None, log_level: str) -> None:
    """Answer a RabbitMQ or EMQX cluster's authentication and authorisation requests
    with this keystore's access keys, until SIGINT/SIGTERM."""
    state = current_state()
    settings = load_settings(config or state.config).with_db(
        db if db is not None else state.db_override).with_overrides(
        audit_path=audit_log, authsvc_host=host, authsvc_port=port)
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = settings.db_path.absolute()
    if settings.db_url is None and not path.exists():  # the service never creates one
        raise NotFoundError(f"no keystore at {str(path)!r} ({CREATE_HINT})")
    from broker.authsvc.server import AuthServer  # aiohttp loads here, not with the CLI

    loop.run(AuthServer(settings).serve)
