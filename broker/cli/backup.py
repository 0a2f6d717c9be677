"""`keybroker backup FILE`: an online, consistent copy of the live SQLite keystore.

Restore is deliberately not a command (a running daemon cannot be detected reliably from
here): stop the daemon, copy the backup over the database path, remove any stale
``-wal``/``-shm`` next to it, start the daemon. See README, "Backup and restore".
A PostgreSQL keystore is backed up with PostgreSQL's own ``pg_dump`` (the command says
how): it is consistent while keybroker writes, and ``pg_restore`` brings it back into an
empty database.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import click

from broker.cli.common import current_state, keystore_location
from keystore.errors import KeybrokerError
from keystore.sqlite.backup import backup


def pg_dump_advice(shown_url: str, file: Path) -> str:
    return (f"keybroker backup copies SQLite keystores; back up the PostgreSQL keystore "
            f"{shown_url} with pg_dump: pg_dump --format=custom --file {file} "
            f"'{shown_url}' (restore into an empty database: pg_restore --dbname URL {file})")


@click.command("backup")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def backup_cmd(file: Path, as_json: bool) -> None:
    """Copy the SQLite keystore to the new FILE (mode 0600), safely while the daemon runs.

    FILE must not exist. The copy is a complete keystore: to restore, stop the daemon,
    copy FILE over the database path, delete its -wal/-shm files, start the daemon.
    A PostgreSQL keystore is backed up with pg_dump (the error says how).
    """
    settings = current_state().settings
    if settings.db_url is not None:
        raise KeybrokerError(pg_dump_advice(settings.keystore_shown, file))
    source = keystore_location()
    report = asyncio.run(backup(source, file))
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    click.echo(
        f"backed up {report.source} to {report.dest}: {report.devices} devices, "
        f"{report.keys} keys (schema version {report.schema_version}, {report.size} bytes, "
        "mode 0600)"
    )
