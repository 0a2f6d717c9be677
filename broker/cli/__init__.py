"""The `keybroker` command line: a thin click shell over the keystore library.

Commands parse options, call one ``KeyStore`` method through ``run_store`` and print text
or ``--json``. ``KeybrokerGroup`` turns every user-facing error into a one-line message
and a non-zero exit, and loads a command's module only when that command runs: the
daemon's modules (amqtt, aiohttp, the console) and asyncpg cost a scripted CLI call
most of its time, and `keybroker --version` needs none of them. New commands go in
``COMMANDS``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import click

from broker.core.environment import ENV_CONFIG, ENV_DB

# Command name -> "module:attribute" of its click command, imported when it runs.
COMMANDS = {
    "apps": "broker.cli.apps:apps",
    "authsvc": "broker.cli.authsvc:authsvc",
    "backup": "broker.cli.backup:backup_cmd",
    "config": "broker.cli.config:config_cmd",
    "devices": "broker.cli.devices:devices",
    "keys": "broker.cli.keys:keys",
    "migrate": "broker.cli.migrate:migrate_cmd",
    "seed": "broker.cli.seed:seed",
    "serve": "broker.cli.serve:serve",
    "tokens": "broker.cli.tokens:tokens",
}


class KeybrokerGroup(click.Group):
    """The top-level group: commands from ``COMMANDS``, loaded on use; every command
    (sub-groups included) runs inside ``translate_errors``."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, _, attribute = COMMANDS[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return self.commands.get(cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from broker.cli.common import translate_errors

        with translate_errors():
            return super().invoke(ctx)


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
    from broker.cli.common import CliState

    ctx.obj = CliState(db, config, verbose)


if __name__ == "__main__":
    main()
