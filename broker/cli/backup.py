"""`keybroker backup FILE`: an online, consistent copy of the live keystore.

Restore is deliberately not a command (a running daemon cannot be detected reliably from
here): stop the daemon, copy the backup over the database path, remove any stale
``-wal``/``-shm`` next to it, start the daemon. See README, "Backup and restore".
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import click

from broker.cli.common import keystore_path
from keystore.sqlite.backup import backup


@click.command("backup")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def backup_cmd(file: Path, as_json: bool) -> None:
    """Copy the keystore to the new FILE (mode 0600), safely while the daemon runs.

    FILE must not exist. The copy is a complete keystore: to restore, stop the daemon,
    copy FILE over the database path, delete its -wal/-shm files, start the daemon.
    """
    source = keystore_path()
    report = asyncio.run(backup(source, file))
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    click.echo(
        f"backed up {report.source} to {report.dest}: {report.devices} devices, "
        f"{report.keys} keys (schema version {report.schema_version}, {report.size} bytes, "
        "mode 0600)"
    )
