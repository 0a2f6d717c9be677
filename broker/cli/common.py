"""Plumbing shared by the CLI commands: opening the store, error translation, option parsing.

The CLI is a thin shell over the keystore library: commands parse their options with the
helpers here, run one coroutine against the store with ``run_store`` and print. Every
user-facing error (``KeybrokerError``) becomes a one-line ``click.ClickException`` in
``translate_errors``, which the top-level group wraps around every command.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from broker.core.environment import ENV_APP
from broker.core.settings import Settings, load_settings
from keystore import KeyStore
from keystore.errors import ConfigError, KeybrokerError, NotFoundError, ValidationError
from keystore.models import AddressMode, Tag, TopicMode
from keystore.validation import parse_tag

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CliState:
    """What the top-level group knows: --db, --config and --verbose; settings load lazily."""

    def __init__(
        self, db_override: str | None = None, config: Path | None = None, verbose: bool = False
    ) -> None:
        self.db_override = db_override
        self.config = config
        self.verbose = verbose
        self.app: str | None = None  # --app (or KEYBROKER_APP): None = "default"

    @functools.cached_property
    def settings(self) -> Settings:
        # Loaded on first use so that --help and --version work even with a broken config.
        return load_settings(self.config).with_db(self.db_override)


def current_state() -> CliState:
    state = click.get_current_context().find_object(CliState)
    return state if state is not None else CliState()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).splitlines()).strip()
    return text or type(exc).__name__


class ConfigException(click.ClickException):
    """A bad setting: one line, exit code 2 (like a usage error, without the usage)."""

    exit_code = 2


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn every error a user can cause into a one-line message and a non-zero exit."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigException(one_line(exc)) from None
    except KeybrokerError as exc:
        raise click.ClickException(one_line(exc)) from None
    except sqlite3.Error as exc:
        raise click.ClickException(f"database error: {one_line(exc)}") from None
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or one_line(exc)}") from None
    except Exception as exc:
        if not is_postgres_error(exc):
            raise
        raise click.ClickException(f"database error: {one_line(exc)}") from None


def is_postgres_error(exc: BaseException) -> bool:
    """An error PostgreSQL reported. asyncpg is only loaded when a command opens a
    PostgreSQL keystore (it costs every other CLI call its load time): until then no
    error can be one of its."""
    asyncpg = sys.modules.get("asyncpg")
    return asyncpg is not None and isinstance(exc, asyncpg.PostgresError)


CREATE_HINT = (
    "create one with `keybroker devices add ID`, `keybroker keys create` or `keybroker serve`"
)


def keystore_shown() -> str:
    """The keystore the command works on as named in messages: a file's absolute path, or
    a URL without its password."""
    return current_state().settings.keystore_shown


def keystore_location(*, create: bool = False) -> str:
    """The keystore the command works on, checked before use (and named on stderr with
    --verbose): an SQLite file's absolute path, or a PostgreSQL URL.

    Only commands that add something pass ``create=True`` (a file's parent directory is
    then made). Any other command on a missing file is an error saying where it looked: a
    listing run from the wrong directory must not create an empty keystore there. (A
    PostgreSQL database is made by its administrator; keybroker creates its tables.)"""
    settings = current_state().settings
    if current_state().verbose:
        click.echo(f"keystore: {settings.keystore_shown}", err=True)
    if settings.db_url is not None:
        return settings.db_url
    path = settings.db_path.absolute()
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise NotFoundError(f"no keystore at {str(path)!r} ({CREATE_HINT})")
    return str(path)


def run_store(action: Callable[[KeyStore], Awaitable[T]], *, create: bool = False) -> T:
    """Open the configured keystore, run ``action`` on it in a fresh event loop, close it."""
    target = keystore_location(create=create)
    settings = current_state().settings
    if settings.db_url is None:
        settings = settings.with_db(target)  # the absolute path

    async def go() -> T:
        async with settings.open_keystore(create=create) as ks:
            app = current_state().app
            if app is not None:
                ks.default_app = app
            return await action(ks)

    return asyncio.run(go())


def _remember_app(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        current_state().app = value


def app_option(f: F) -> F:
    """--app APP (name or id; env KEYBROKER_APP) on a devices/keys command: the
    application it works in. Without it, the one named "default"."""
    return click.option("--app", envvar=ENV_APP, expose_value=False, callback=_remember_app,
                        metavar="APP", help="Application name or id (default: 'default'; "
                        f"env {ENV_APP}).")(f)


def stdin_is_interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def confirm_or_abort(prompt: str, yes: bool) -> None:
    """Ask before destroying something; never wait on (or guess from) a non-terminal stdin."""
    if yes:
        return
    if not stdin_is_interactive():
        raise click.ClickException(
            "confirmation needed and stdin is not a terminal: use --yes to confirm"
        )
    try:
        confirmed = click.confirm(prompt, default=False)
    except click.Abort:
        confirmed = False
    if not confirmed:
        raise click.ClickException("not confirmed, nothing changed (use --yes to confirm)")


def parse_tags(specs: Iterable[str]) -> tuple[Tag, ...]:
    return tuple(parse_one_tag(spec) for spec in specs)


def parse_one_tag(spec: str) -> Tag:
    try:
        return parse_tag(spec)
    except ValidationError as exc:
        if repr(spec) in str(exc):
            raise
        # e.g. "invalid tag key '': ..." does not say which argument it came from
        raise ValidationError(f"invalid tag {spec!r}: {exc}") from None


def address_restriction(
    allow: Iterable[str], deny: Iterable[str], any_ip: bool = False
) -> tuple[AddressMode, tuple[str, ...]] | None:
    """(mode, addresses) from --allow-ip / --deny-ip / --any-ip, or None when none was given."""
    allow, deny = tuple(allow), tuple(deny)
    if sum((bool(allow), bool(deny), any_ip)) > 1:
        raise ValidationError(
            "--allow-ip, --deny-ip and --any-ip are mutually exclusive: "
            "a key allows only some addresses, or all but some, or any"
        )
    if allow:
        return AddressMode.ONLY, allow
    if deny:
        return AddressMode.EXCEPT, deny
    if any_ip:
        return AddressMode.ALL, ()
    return None


def topic_mode_for_create(
    mode: str | None, pub: tuple[str, ...], sub: tuple[str, ...]
) -> TopicMode:
    """--topics, defaulting to "only" when filters are given and to "none" otherwise."""
    if mode is not None:
        return TopicMode(mode)
    return TopicMode.ONLY if (pub or sub) else TopicMode.NONE


def short_key(key: str) -> str:
    return key[:8]
