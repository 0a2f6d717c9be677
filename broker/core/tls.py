"""TLS for the MQTT listeners and the HTTP API: server contexts from PEM files.

Every configured certificate and key is checked before any listener starts
(``check_tls_files``), and a bad one is one line naming the file and what is wrong with
it: OpenSSL's own errors name neither file and are codes to an operator ("PEM lib",
"unknown error 524297" for a swapped certfile and keyfile). Only the ``ssl`` module is
used; a file's PEM block labels say what it holds.
"""

from __future__ import annotations

import os
import re
import ssl

from broker.core.settings import Settings
from keystore.errors import KeybrokerError

MAX_PEM_BYTES = 1 << 20  # a certificate chain is a few KiB; anything larger is not one
_BLOCK = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----", re.MULTILINE)


class _KeyIsEncrypted(Exception):
    """Raised by the password callback: OpenSSL would otherwise prompt on the terminal."""


def _no_password() -> bytes:
    raise _KeyIsEncrypted


def _labels(role: str, path: str) -> list[str]:
    """The PEM block labels in the file (``CERTIFICATE``, ``PRIVATE KEY``, ...)."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PEM_BYTES)
    except FileNotFoundError:
        raise KeybrokerError(f"{role} {path}: not found") from None
    except PermissionError:
        raise KeybrokerError(f"{role} {path}: not readable (permission denied)") from None
    except OSError as exc:
        raise KeybrokerError(f"{role} {path}: cannot be read: {exc.strerror}") from None
    return [label.decode() for label in _BLOCK.findall(data)]


def _is_certificate(label: str) -> bool:
    return label.endswith("CERTIFICATE")  # not "CERTIFICATE REQUEST"


def _is_private_key(label: str) -> bool:
    return label.endswith("PRIVATE KEY")


def ssl_context(certfile: object, keyfile: object) -> ssl.SSLContext:
    """A server-side TLS context from a PEM certificate chain and its unencrypted PEM
    private key; a KeybrokerError naming the file and the problem when they cannot be."""
    cert, key = os.path.abspath(str(certfile)), os.path.abspath(str(keyfile))
    cert_labels, key_labels = _labels("certfile", cert), _labels("keyfile", key)
    if not any(map(_is_certificate, cert_labels)):
        swapped = " but a private key (certfile and keyfile swapped?)" \
            if any(map(_is_private_key, cert_labels)) else " (a PEM certificate chain)"
        raise KeybrokerError(f"certfile {cert} holds no certificate{swapped}")
    if not any(map(_is_private_key, key_labels)):
        if any(map(_is_certificate, key_labels)):
            raise KeybrokerError(f"keyfile {key} holds a certificate, not a private key")
        raise KeybrokerError(f"keyfile {key} holds no private key (a PEM private key)")
    if "ENCRYPTED PRIVATE KEY" in key_labels:
        raise KeybrokerError(f"keyfile {key} is encrypted: keybroker needs an unencrypted "
                             "key, readable only by the daemon")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _KeyIsEncrypted:  # the older "Proc-Type: 4,ENCRYPTED" form
        raise KeybrokerError(f"keyfile {key} is encrypted: keybroker needs an unencrypted "
                             "key, readable only by the daemon") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise KeybrokerError(f"keyfile {key} does not match certfile {cert}") from None
        reason = exc.reason or "not a valid PEM certificate chain and private key"
        raise KeybrokerError(f"certfile {cert} and keyfile {key} cannot be used: "
                             f"{reason.lower().replace('_', ' ')}") from None
    return context


def check_tls_files(settings: Settings) -> None:
    """Every certificate and key the settings name (TLS listeners, [api]) can be used:
    called before anything starts, so that a bad file stops the start with one line."""
    for listener in settings.listeners:
        if listener.tls:
            _checked(f"listener {listener.name!r}", listener.certfile, listener.keyfile)
    if settings.api_enabled and settings.api_certfile is not None:
        _checked("API listener", settings.api_certfile, settings.api_keyfile)


def _checked(what: str, certfile: object, keyfile: object) -> None:
    try:
        ssl_context(certfile, keyfile)
    except KeybrokerError as exc:
        raise KeybrokerError(f"{what}: {exc}") from None
