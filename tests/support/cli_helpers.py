"""Helpers for tests of the `keybroker` CLI through click's CliRunner."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner, Result

from broker.cli import main
from keystore.location import is_url

Invoke = Callable[..., Result]


def cli_on(db: Path | str) -> Invoke:
    """`keybroker --db DB ARGS...` in-process; exceptions propagate (no hidden tracebacks)."""
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(main, ["--db", str(db), *args], input=input, catch_exceptions=False)

    return invoke


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def no_keys_stored(cli: Invoke, db: Path | str) -> bool:
    """Nothing was written: the keystore file was not even created, or it holds no key."""
    if not is_url(str(db)) and not Path(db).exists():
        return True
    return bool(json.loads(ok(cli("keys", "list", "--json")).stdout) == [])


def fails(result: Result, *needles: str) -> str:
    """A clean failure: non-zero exit, one 'Error:' line on stderr naming the bad value."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
