"""The one-line error for a listener that cannot start (MQTT's and the HTTP ones)."""

from __future__ import annotations

import os
import socket
import ssl

from keystore.errors import KeybrokerError


def bind_error(what: str, host: str, port: int, exc: OSError) -> KeybrokerError:
    """One line naming the listener, its address and the reason it could not start."""
    where = f"[{host}]" if ":" in host else host
    # asyncio's bind error repeats the address in strerror: the errno's text is enough.
    reason = (os.strerror(exc.errno) if exc.errno and not isinstance(exc, socket.gaierror)
              else exc.strerror or str(exc)).lower()
    if isinstance(exc, socket.gaierror):
        reason = f"unknown host ({reason})"
    verb = "use certificate" if isinstance(exc, ssl.SSLError) else "bind"
    return KeybrokerError(f"{what} cannot {verb} {where}:{port}: {reason}")
