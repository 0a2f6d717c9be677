"""The `keybroker` command line: a thin click shell over the keystore library.

Commands parse options, call one ``KeyStore`` method through ``run_store`` and print text
or ``--json``. ``KeybrokerGroup`` turns every user-facing error into a one-line message
and a non-zero exit. Other commands plug in with ``main.add_command(...)`` at the bottom.
"""

from __future__ import annotations

from pathlib import Path

import click

from broker.cli.apps import apps
from broker.cli.authsvc import authsvc
from broker.cli.backup import backup_cmd
from broker.cli.common import CliState, KeybrokerGroup
from broker.cli.config import config_cmd
from broker.cli.devices import devices
from broker.cli.keys import keys
from broker.cli.migrate import migrate_cmd
from broker.cli.seed import seed
from broker.cli.serve import serve
from broker.cli.tokens import tokens
from broker.settings import ENV_CONFIG, ENV_DB


@click.group(cls=KeybrokerGroup)
@click.option(
    "--db",
    envvar=ENV_DB,
    default=None,
    metavar="PATH|URL",
    help=f"Keystore: an SQLite file, or postgresql://user@host:port/dbname (env {ENV_DB}; "
    "default: [keystore] url or path of the config, else data/keybroker.db in the current "
    "directory).",
)
@click.option(
    "--config",
    type=click.Path(path_type=Path),  # checked (one line, exit 2) by load_settings
    envvar=ENV_CONFIG,
    default=None,
    help=f"TOML config file (env {ENV_CONFIG}; default: none, built-in defaults). "
    "See `keybroker config example`.",
)
@click.option("-v", "--verbose", is_flag=True, help="Say which keystore is used (stderr).")
@click.version_option(package_name="keybroker", prog_name="keybroker")
@click.pass_context
def main(ctx: click.Context, db: str | None, config: Path | None, verbose: bool) -> None:
    """keybroker: an MQTT broker whose only way in is an access key."""
    ctx.obj = CliState(db, config, verbose)


main.add_command(apps)
main.add_command(devices)
main.add_command(keys)
main.add_command(seed)
main.add_command(tokens)
main.add_command(serve)
main.add_command(authsvc)
main.add_command(backup_cmd)
main.add_command(migrate_cmd)
main.add_command(config_cmd)


if __name__ == "__main__":
    main()
