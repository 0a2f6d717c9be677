"""How the CLI prints things: tables, one-field-per-line details, JSON, and secrets.

Secrets appear in exactly two places: the output of a key's creation, or a file created
with mode 0600 that never overwrites an existing one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import click

from broker.cli.common import short_key
from keystore.models import AccessKey, Device, Tag, iso

SECRET_NOTICE = "The secret is shown only this once and cannot be recovered: store it now."  # noqa: S105 - a notice, not a secret
FILED_NOTICE = "That file is the only copy of the secret (it cannot be recovered): keep it safe."


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def tags_text(tags: Sequence[Tag]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags)


def when(ts: datetime | None, none: str = "never") -> str:
    return iso(ts) or none


def ellipsize(text: str, width: int = 32) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# --- keys ---------------------------------------------------------------------------


def devices_summary(key: AccessKey) -> str:
    if key.all_devices:
        return "all"
    parts = [*key.device_ids, *(f"{k}={v}" for k, v in key.device_tags)]
    return ellipsize(",".join(parts))


def topics_summary(key: AccessKey) -> str:
    mode = key.topic_mode.value
    if mode in ("only", "except"):
        return f"{mode} ({len(key.pub_topics)} pub, {len(key.sub_topics)} sub)"
    return mode


def addresses_summary(key: AccessKey) -> str:
    mode = key.address_mode.value
    return mode if mode == "all" else f"{mode} ({len(key.addresses)})"


def expiry_text(key: AccessKey) -> str:
    if key.expires_at is None:
        return "never"
    expired = " (expired)" if key.is_expired(datetime.now(UTC)) else ""
    return f"{iso(key.expires_at)}{expired}"


def key_table(keys: Sequence[AccessKey], full: bool) -> str:
    headers = ("KEY", "NAME", "STATUS", "DEVICES", "TOPICS", "IP", "EXPIRES", "LAST USED")
    rows = [
        (
            k.key if full else short_key(k.key),
            k.name or "-",
            k.status.value,
            devices_summary(k),
            topics_summary(k),
            addresses_summary(k),
            expiry_text(k),
            when(k.last_used),
        )
        for k in keys
    ]
    return table(headers, rows)


def key_details(key: AccessKey) -> str:
    fields = [
        ("key", key.key),
        ("name", key.name or "-"),
        ("description", key.description or "-"),
        ("status", key.status.value),
        ("devices", "all" if key.all_devices else "restricted (id listed or any tag pair)"),
        ("device ids", ", ".join(key.device_ids) or "-"),
        ("device tags", ", ".join(f"{k}={v}" for k, v in key.device_tags) or "-"),
        ("topics", key.topic_mode.value),
        ("publish topics", ", ".join(key.pub_topics) or "-"),
        ("subscribe topics", ", ".join(key.sub_topics) or "-"),
        ("ip mode", key.address_mode.value),
        ("addresses", ", ".join(key.addresses) or "-"),
        ("expires", expiry_text(key)),
        ("created", when(key.created_at)),
        ("updated", when(key.updated_at)),
        ("last used", when(key.last_used)),
    ]
    return "\n".join(f"{name + ':':<18}{value}" for name, value in fields)


# --- devices ------------------------------------------------------------------------


def device_table(devices: Sequence[Device]) -> str:
    headers = ("ID", "NAME", "TAGS", "CONNECTED", "LAST SEEN")
    rows = [
        (
            d.id,
            d.name or "-",
            ellipsize(tags_text(d.tags)) or "-",
            "yes" if d.connected else "no",
            when(d.last_seen),
        )
        for d in devices
    ]
    return table(headers, rows)


def device_details(device: Device) -> str:
    fields = [
        ("id", device.id),
        ("name", device.name or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in device.tags) or "-"),
        ("connected", "yes" if device.connected else "no"),
        ("last seen", when(device.last_seen)),
        ("created", when(device.created_at)),
        ("updated", when(device.updated_at)),
    ]
    return "\n".join(f"{name + ':':<11}{value}" for name, value in fields)


# --- secrets ------------------------------------------------------------------------


def open_exclusive(path: str) -> TextIO:
    """Create ``path`` for writing with mode 0600; refuse to touch an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.ClickException(f"refusing to overwrite existing file {path!r}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot create {path!r}: {exc.strerror}") from None
    os.fchmod(fd, 0o600)  # independent of the umask
    return os.fdopen(fd, "w", encoding="utf-8")


@dataclass(frozen=True, slots=True)
class SecretSink:
    """Where new secrets go instead of stdout: JSON lines in a 0600 file."""

    path: str
    handle: TextIO

    def write(self, doc: dict[str, Any]) -> None:
        self.handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
        self.handle.flush()


@contextmanager
def secret_file(path: str | None) -> Iterator[SecretSink | None]:
    """The --output file, opened *before* any key is created so a bad path costs no key.

    If nothing was written to it (the creation failed), the empty file is removed.
    """
    if path is None:
        yield None
        return
    handle = open_exclusive(path)
    try:
        yield SecretSink(path, handle)
    finally:
        written = handle.tell() > 0
        handle.close()
        if not written:
            os.unlink(path)


def warn_if_expired(key: AccessKey) -> None:
    if key.is_expired(datetime.now(UTC)):
        click.echo(
            f"warning: key {short_key(key.key)} expired at {iso(key.expires_at)}: "
            "it authenticates nothing until its expiry is moved (keys update --expires)",
            err=True,
        )


def report_created(key: AccessKey, secret: str, as_json: bool, sink: SecretSink | None) -> None:
    """Print a new key; its secret goes to ``sink`` when given, else to stdout (once)."""
    warn_if_expired(key)
    if sink is not None:
        sink.write({"key": key.key, "secret": secret})
        if as_json:
            echo_json(key.to_losant())
        else:
            click.echo(f"key:    {key.key}")
            click.echo(f"secret: written to {sink.path} (mode 0600), not shown")
            click.echo(FILED_NOTICE)
        return
    if as_json:
        echo_json({**key.to_losant(), "secret": secret})
        return
    click.echo(f"key:    {key.key}")
    click.echo(f"secret: {secret}")
    click.echo(SECRET_NOTICE)
