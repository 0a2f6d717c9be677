"""Where a keystore lives: a plain path is an SQLite file, a ``postgresql://`` URL a
PostgreSQL database. URLs are shown to operators without their password."""

from __future__ import annotations

import urllib.parse

from keystore.errors import ConfigError

POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_url(target: str) -> bool:
    """A URL names a database server; anything else is an SQLite file path."""
    return "://" in target


def redact(url: str) -> str:
    """``url`` without its password (in the user part or a ``password=`` parameter)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = user.partition(":")[0] + "@" + host
    query = "&".join(
        item for item in parts.query.split("&")
        if item and not item.lower().startswith(("password=", "passfile="))
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_postgres_url(url: str) -> str:
    """``url`` if it is a PostgreSQL URL keybroker can use, else a ConfigError naming it
    (without its password) and what is wrong."""
    shown = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid keystore URL {shown!r}: {exc}") from None
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(
            f"invalid keystore URL {shown!r}: unsupported scheme {parts.scheme!r} "
            "(use postgresql://user@host:port/dbname, or a plain path for an SQLite file)")
    if not parts.path.strip("/"):
        raise ConfigError(
            f"invalid keystore URL {shown!r}: no database name "
            "(use postgresql://user@host:port/dbname)")
    if port == 0:
        raise ConfigError(f"invalid keystore URL {shown!r}: port 0")
    return url
