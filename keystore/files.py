"""Private files: the keystore, its SQLite sidecars, backups and the audit log are mode
0600 (they hold secrets' hashes, the device inventory, client addresses)."""

from __future__ import annotations

import logging
import os

from keystore.errors import KeybrokerError

log = logging.getLogger(__name__)


def create_private_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """Create ``path`` with mode 0600 if it does not exist (before SQLite or a log handler
    would create it with 0644 & ~umask); an existing file is made private (see below)."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise KeybrokerError(f"cannot open {what} {os.fspath(path)!r}: {exc.strerror}") from None
    os.close(fd)
    tighten_mode(path)


def tighten_mode(path: str | os.PathLike[str]) -> None:
    """An existing file others may read or write is made 0600 again, with a warning: a file
    created by an older version, or chmod-ed by hand, keeps no looser mode."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        return
    if mode & 0o077:
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            log.warning("%s has mode %04o and cannot be made 0600: %s", os.fspath(path), mode,
                        exc.strerror)
            return
        log.warning("%s had mode %04o: tightened to 0600", os.fspath(path), mode)
