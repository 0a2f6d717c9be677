"""`keybroker config ...`: the documented example config and the settings in effect."""

from __future__ import annotations

import click

from broker.cli.common import current_state
from broker.core.settings import config_path, example_config, settings_to_toml


@click.group("config")
def config_cmd() -> None:
    """Show the example config or the settings in effect."""


@config_cmd.command("example")
def example() -> None:
    """Print the example config: every setting at its default, each one explained.

    Save it (`keybroker config example > keybroker.toml`), edit it, and use it with
    `keybroker --config keybroker.toml ...` or KEYBROKER_CONFIG."""
    click.echo(example_config(), nl=False)


@config_cmd.command("show")
def show() -> None:
    """Print the settings in effect (defaults, config file, --db) as TOML.

    Paths are absolute; the output is itself a valid config file. It holds no secret."""
    state = current_state()
    source = config_path(state.config)
    origin = f"config file {source.absolute()}" if source else "built-in defaults (no config file)"
    shown = settings_to_toml(state.settings)  # a bad config: its one-line error, nothing else
    click.echo(f"# keybroker settings in effect: {origin}")
    click.echo(shown, nl=False)
