"""`keybroker migrate --from SQLITE_PATH --to postgresql://...`: move a whole keystore
from its SQLite file into an empty PostgreSQL database (keystore.postgres.copy)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from pathlib import Path

import click

from keystore.location import check_postgres_url


@click.command("migrate")
@click.option("--from", "source", required=True,
              type=click.Path(path_type=Path, dir_okay=False), metavar="SQLITE_PATH",
              help="The SQLite keystore file to copy.")
@click.option("--to", "target", required=True, metavar="URL",
              help="An empty PostgreSQL database: postgresql://user@host:port/dbname.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def migrate_cmd(source: Path, target: str, as_json: bool) -> None:
    """Copy every application, device, key (with its secret's hash) and token from an
    SQLite keystore into an empty PostgreSQL one, and verify the row counts.

    Stop the daemon first: what it writes to the file meanwhile is not copied. The file
    is left as it was (apart from a schema upgrade); keys and secrets keep working.
    """
    check_postgres_url(target)
    from keystore.postgres.copy import copy_keystore  # asyncpg loads here, not with the CLI

    report = asyncio.run(copy_keystore(source.absolute(), target))
    if as_json:
        click.echo(json.dumps(asdict(report)))
        return
    counts = report.counts
    click.echo(
        f"migrated {report.source} to {report.target}: {counts['applications']} applications, "
        f"{counts['devices']} devices, {counts['access_keys']} keys, "
        f"{counts['api_tokens']} API tokens, {counts['device_tokens']} device tokens "
        "(row counts verified)")
