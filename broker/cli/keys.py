"""`keybroker keys ...`: create, list, show, update, (de)activate and delete access keys."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from broker.cli.common import (
    address_restriction,
    app_option,
    confirm_or_abort,
    keystore_shown,
    parse_tags,
    run_store,
    short_key,
    topic_mode_for_create,
)
from broker.cli.output import (
    echo_json,
    key_details,
    key_table,
    report_created,
    secret_file,
    warn_if_expired,
)
from keystore import UNSET, KeyStore
from keystore.errors import ValidationError
from keystore.models import AccessKey, KeyStatus, TopicMode
from keystore.validation import parse_when

F = TypeVar("F", bound=Callable[..., Any])
TOPIC_MODES = click.Choice([m.value for m in TopicMode])


@click.group()
def keys() -> None:
    """Manage access keys (MQTT username = key, password = secret).

    KEY names one key of the application: its key, its id, its name, or a prefix of its
    key of at least 8 characters; a KEY that could name several keys is refused with
    them listed."""


def ip_options(update: bool) -> Callable[[F], F]:
    """--allow-ip / --deny-ip (and --any-ip on update): one decorator for both commands."""

    def decorate(f: F) -> F:
        if update:
            f = click.option("--any-ip", is_flag=True, help="Lift the connection restriction.")(f)
        f = click.option(
            "--deny-ip",
            "deny_ips",
            multiple=True,
            metavar="ADDR|CIDR",
            help="Refuse connections from these addresses (repeatable).",
        )(f)
        return click.option(
            "--allow-ip",
            "allow_ips",
            multiple=True,
            metavar="ADDR|CIDR",
            help="Accept connections only from these addresses (repeatable).",
        )(f)

    return decorate


def topic_options(f: F) -> F:
    f = click.option(
        "--sub", "sub", multiple=True, metavar="FILTER", help="Subscribe topic filter (repeatable)."
    )(f)
    f = click.option(
        "--pub", "pub", multiple=True, metavar="FILTER", help="Publish topic filter (repeatable)."
    )(f)
    return click.option(
        "--topics",
        type=TOPIC_MODES,
        default=None,
        help="Additional (non-device) topics: none, all, only or except the --pub/--sub filters.",
    )(f)


@keys.command("create")
@app_option
@click.option("--name", help="Key name (unique among keys).")
@click.option("--description", help="Free text.")
@click.option(
    "--device",
    "device_ids",
    multiple=True,
    metavar="ID",
    help="Restrict to this device (repeatable). Immutable after creation.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="K=V",
    help="Restrict to devices with this tag (repeatable). Immutable after creation.",
)
@ip_options(update=False)
@topic_options
@click.option("--expires", metavar="ISO-8601", help="Expiry date/time (naive = UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print the key document plus secret as JSON.")
@click.option(
    "--output",
    type=click.Path(dir_okay=False),
    help="Write key/secret to this new file (mode 0600) instead of stdout.",
)
def create(
    name: str | None,
    description: str | None,
    device_ids: tuple[str, ...],
    tags: tuple[str, ...],
    allow_ips: tuple[str, ...],
    deny_ips: tuple[str, ...],
    topics: str | None,
    pub: tuple[str, ...],
    sub: tuple[str, ...],
    expires: str | None,
    as_json: bool,
    output: str | None,
) -> None:
    """Create an access key; its secret is shown once.

    Without --device/--tag the key works for all devices. --pub/--sub without --topics
    mean --topics only.
    """
    address = address_restriction(allow_ips, deny_ips)
    options: dict[str, Any] = {
        "name": name,
        "description": description,
        "device_ids": device_ids,
        "device_tags": parse_tags(tags),
        "topic_mode": topic_mode_for_create(topics, pub, sub),
        "pub_topics": pub,
        "sub_topics": sub,
        "expires_at": parse_when(expires) if expires is not None else None,
    }
    if address is not None:
        options["address_mode"], options["addresses"] = address
    with secret_file(output) as sink:
        created, secret = run_store(lambda ks: ks.create_key(**options), create=True)
        report_created(created, secret, as_json, sink)


def parse_query(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"invalid --query JSON {text!r}: {exc}") from None


@keys.command("list")
@app_option
@click.option(
    "--query",
    metavar="JSON",
    help='Advanced query, e.g. \'{"status": "active", "name": {"$like": "gw-*"}}\'.',
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of key documents.")
@click.option("--full", is_flag=True, help="Print whole keys, not their first 8 characters.")
def list_(query: str | None, as_json: bool, full: bool) -> None:
    """List keys (never their secrets)."""
    parsed = parse_query(query)
    found = run_store(lambda ks: ks.list_keys(parsed))
    if as_json:
        echo_json([k.to_losant() for k in found])
        return
    click.echo(f"keystore: {keystore_shown()}")
    click.echo(key_table(found, full) if found else "no keys")


@keys.command("show")
@app_option
@click.argument("key", metavar="KEY")
@click.option("--json", "as_json", is_flag=True, help="Print the key document as JSON.")
def show(key: str, as_json: bool) -> None:
    """Show one key (KEY: its key, id, name or a unique key prefix)."""
    print_key(run_store(lambda ks: ks.get_key(key)), as_json)


def print_key(key: AccessKey, as_json: bool) -> None:
    if as_json:
        echo_json(key.to_losant())
    else:
        click.echo(key_details(key))


def blank_is_none(value: str | None) -> Any:
    """For update: option absent = leave as is; empty string = clear."""
    if value is None:
        return UNSET
    return value or None


def update_changes(
    name: str | None,
    description: str | None,
    address: Any,
    topics: str | None,
    pub: tuple[str, ...],
    sub: tuple[str, ...],
    expires: str | None,
    no_expiry: bool,
) -> dict[str, Any]:
    if expires is not None and no_expiry:
        raise ValidationError("--expires and --no-expiry are mutually exclusive")
    changes: dict[str, Any] = {
        "name": blank_is_none(name),
        "description": blank_is_none(description),
        "topic_mode": TopicMode(topics) if topics is not None else UNSET,
        "pub_topics": pub if pub else UNSET,
        "sub_topics": sub if sub else UNSET,
        "expires_at": None if no_expiry else parse_when(expires) if expires is not None else UNSET,
    }
    if topics in ("none", "all") and not (pub or sub):
        # These modes take no filters: switching to one clears both lists.
        changes["pub_topics"], changes["sub_topics"] = (), ()
    if address is not None:
        changes["address_mode"], changes["addresses"] = address
    return {k: v for k, v in changes.items() if v is not UNSET}


@keys.command("update")
@app_option
@click.argument("key", metavar="KEY")
@click.option("--name", help="New name ('' clears it).")
@click.option("--description", help="New description ('' clears it).")
@ip_options(update=True)
@topic_options
@click.option("--expires", metavar="WHEN", help="New expiry (ISO-8601, naive = UTC).")
@click.option("--no-expiry", is_flag=True, help="Remove the expiry.")
@click.option("--device", "device_ids", multiple=True, hidden=True)
@click.option("--tag", "tags", multiple=True, hidden=True)
@click.option("--json", "as_json", is_flag=True, help="Print the updated key as JSON.")
def update(
    key: str,
    name: str | None,
    description: str | None,
    allow_ips: tuple[str, ...],
    deny_ips: tuple[str, ...],
    any_ip: bool,
    topics: str | None,
    pub: tuple[str, ...],
    sub: tuple[str, ...],
    expires: str | None,
    no_expiry: bool,
    device_ids: tuple[str, ...],
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Change a key (KEY: its key, id, name or a unique key prefix). Its device
    restriction cannot be changed: create a new key instead."""
    address = address_restriction(allow_ips, deny_ips, any_ip)
    changes = update_changes(name, description, address, topics, pub, sub, expires, no_expiry)
    if device_ids or tags:
        # Handed to the library, which refuses them with its one clear immutability error.
        changes["device_ids"], changes["device_tags"] = device_ids, parse_tags(tags)
    if not changes:
        raise click.UsageError("nothing to update: give at least one option")
    updated = run_store(lambda ks: ks.update_key(key, **changes))
    warn_if_expired(updated)
    print_key(updated, as_json)


def set_status(keys_: tuple[str, ...], status: KeyStatus) -> None:
    changed = run_store(lambda ks: ks.set_status(list(keys_), status))
    for k in changed:
        click.echo(f"{short_key(k.key)} {k.status.value}")


@keys.command("activate")
@app_option
@click.argument("keys_", nargs=-1, required=True, metavar="KEY...")
def activate(keys_: tuple[str, ...]) -> None:
    """Reactivate keys (each KEY: its key, id, name or a unique key prefix)."""
    set_status(keys_, KeyStatus.ACTIVE)


@keys.command("deactivate")
@app_option
@click.argument("keys_", nargs=-1, required=True, metavar="KEY...")
def deactivate(keys_: tuple[str, ...]) -> None:
    """Deactivate keys without deleting them (their sessions are disconnected; each
    KEY: its key, id, name or a unique key prefix)."""
    set_status(keys_, KeyStatus.INACTIVE)


@keys.command("delete")
@app_option
@click.argument("keys_", nargs=-1, required=True, metavar="KEY...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(keys_: tuple[str, ...], yes: bool) -> None:
    """Delete keys for good (their sessions are disconnected; each KEY: its key, id,
    name or a unique key prefix)."""

    async def resolve(ks: KeyStore) -> list[AccessKey]:
        return [await ks.get_key(k) for k in keys_]

    found = run_store(resolve)
    names = ", ".join(
        f"{short_key(k.key)} ({k.name})" if k.name else short_key(k.key) for k in found
    )
    confirm_or_abort(f"Delete {len(found)} key(s): {names}?", yes)
    deleted = run_store(lambda ks: ks.delete_keys([k.key for k in found]))
    for k in deleted:
        click.echo(f"deleted {short_key(k)}")
