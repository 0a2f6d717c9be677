"""A CLI call loads only what its command needs (scripts/cli_startup times it): the
daemon's libraries (amqtt, aiohttp and the console's jinja2, prometheus_client) and
asyncpg load when `serve`, `authsvc` or a PostgreSQL keystore need them, never with the
command line itself. Checked in a fresh interpreter, where nothing was imported before."""

from __future__ import annotations

import json
import subprocess
import sys

DAEMON_ONLY = ("aiohttp", "amqtt", "asyncpg", "jinja2", "prometheus_client")


def loaded_after(code: str) -> set[str]:
    """Top-level package names in sys.modules after running ``code`` in a new Python."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] " \
        "for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True)
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_the_command_line_with_every_command_loads_no_daemon_library() -> None:
    loaded = loaded_after(
        "import click\n"
        "from broker.cli import main\n"
        "ctx = click.Context(main)\n"
        "commands = [main.get_command(ctx, name) for name in main.list_commands(ctx)]\n"
        "assert all(commands) and len(commands) >= 10, commands\n")
    assert "broker" in loaded and "keystore" in loaded  # the commands' modules did load
    assert not loaded & set(DAEMON_ONLY), sorted(loaded & set(DAEMON_ONLY))


def test_version_loads_neither_the_keystore_nor_the_settings() -> None:
    loaded = loaded_after("import broker.cli")
    assert "keystore" not in loaded and "aiosqlite" not in loaded and "netaddr" not in loaded
    assert not loaded & set(DAEMON_ONLY)
