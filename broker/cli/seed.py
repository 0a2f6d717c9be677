"""`keybroker seed FILE`: devices and keys in bulk (keystore.seed has the rules). New
secrets are JSON lines on stdout, or in the --output file (mode 0600)."""

from __future__ import annotations

import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import click

from broker.cli.common import app_option, run_store
from broker.cli.output import FILED_NOTICE, SECRET_NOTICE, SecretSink, secret_file
from keystore.seed import SeedResult, apply_seed, read_seed

PROGRESS_THRESHOLD = 1000
SEED_EXAMPLE = "seed.example.toml"  # package data of `broker`: the format, documented


class Progress(Protocol):
    def update(self, n_steps: int) -> None: ...


class NoProgress:
    def update(self, n_steps: int) -> None:
        pass


class BatchProgress:
    """click's bar on a terminal; elsewhere (logs, pipes) a "done/total" line per batch."""

    def __init__(self, bar: Progress, total: int, interactive: bool) -> None:
        self.bar, self.total, self.interactive, self.done = bar, total, interactive, 0

    def update(self, n_steps: int) -> None:
        self.bar.update(n_steps)
        self.done += n_steps
        if not self.interactive and n_steps:
            click.echo(f"  {self.done}/{self.total}", err=True)


def report(result: SeedResult, sink: SecretSink | None) -> None:
    if result.apps:
        click.echo(f"applications created: {result.apps}", err=True)
    click.echo(
        f"devices: {result.devices}, of which created or changed: {result.changed}", err=True
    )
    click.echo(f"keys created: {result.created}", err=True)
    if result.skipped:
        shown = ", ".join(repr(n) for n in result.skipped[:10])
        more = f" and {len(result.skipped) - 10} more" if len(result.skipped) > 10 else ""
        click.echo(
            f"keys skipped (a key with that name already exists): {len(result.skipped)}: "
            f"{shown}{more}",
            err=True,
        )
    if result.created:
        if sink is not None:
            click.echo(f"new secrets written to {sink.path} (mode 0600). {FILED_NOTICE}",
                       err=True)
        else:
            click.echo(f"new secrets printed above (JSON lines). {SECRET_NOTICE}", err=True)


@click.command("seed")
@app_option
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write new secrets to this new file (mode 0600, JSON lines) instead of stdout.",
)
@click.option("--example", is_flag=True,
              help="Print a documented example seed file (every field explained) and exit.")
def seed(file: Path | None, output: str | None, example: bool) -> None:
    """Create devices and keys in bulk from a TOML or JSON FILE (`keybroker seed
    --example` prints a documented one).

    Idempotent for devices and named keys; new secrets go to stdout as JSON lines
    {"key","name","secret"}, or to --output.
    """
    if example:
        if file is not None or output is not None:
            raise click.ClickException("--example takes no FILE and no --output")
        text = resources.files("broker").joinpath(SEED_EXAMPLE).read_text(encoding="utf-8")
        click.echo(text, nl=False)
        return
    if file is None:
        raise click.ClickException(
            "missing FILE: a seed file (`keybroker seed --example` prints a documented one)")
    plan = read_seed(file)
    devices = sum(map(len, plan.devices.values()))
    keys = sum(map(len, plan.keys.values()))
    total = devices + keys
    with secret_file(output) as sink:

        def secret(doc: dict[str, Any]) -> None:
            if sink is not None:
                sink.write(doc)
            else:
                click.echo(json.dumps(doc, ensure_ascii=False))

        if total > PROGRESS_THRESHOLD:
            label = f"seeding {devices} devices, {keys} keys"
            with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
                progress = BatchProgress(bar, total, interactive=sys.stderr.isatty())
                result = run_store(lambda ks: apply_seed(ks, plan, secret, progress.update),
                                   create=True)
        else:
            result = run_store(lambda ks: apply_seed(ks, plan, secret), create=True)
        report(result, sink)
