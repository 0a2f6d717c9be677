"""`keybroker apps ...`: applications (tenants); every device and key belongs to one."""

from __future__ import annotations

from typing import Any

import click

from broker.cli.common import confirm_or_abort, keystore_shown, run_store
from broker.cli.output import echo_json, table
from keystore import KeyStore
from keystore.models import Application


@click.group()
def apps() -> None:
    """Manage applications: every device and key belongs to one, and applications never
    see each other's devices, topics or retained messages."""


async def _with_counts(ks: KeyStore, app: Application) -> dict[str, Any]:
    doc = app.to_json()
    doc["devices"] = await ks.count_devices(app=app.id)
    doc["keys"] = await ks.count_keys(app=app.id)
    return doc


def _limit(value: int) -> str:
    return str(value) if value else "none"


@apps.command("create")
@click.argument("name")
@click.option("--description", help="Free text.")
@click.option("--max-keys", type=click.IntRange(min=0),
              help="Keys the application may hold (0 = no limit; default: [keystore] max_keys).")
@click.option("--max-devices", type=click.IntRange(min=0),
              help="Devices the application may hold (0 = no limit; default: [keystore] "
                   "max_devices).")
@click.option("--json", "as_json", is_flag=True, help="Print the application as JSON.")
def create(name: str, description: str | None, max_keys: int | None, max_devices: int | None,
           as_json: bool) -> None:
    """Create application NAME."""
    options: dict[str, Any] = {"description": description}
    if max_keys is not None:
        options["max_keys"] = max_keys
    if max_devices is not None:
        options["max_devices"] = max_devices
    app = run_store(lambda ks: ks.create_app(name, **options), create=True)
    if as_json:
        echo_json(app.to_json())
    else:
        click.echo(f"created application {app.name} (id {app.id})")


@apps.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(as_json: bool) -> None:
    """List applications with their numbers of devices and keys."""

    async def gather(ks: KeyStore) -> list[dict[str, Any]]:
        return [await _with_counts(ks, app) for app in await ks.list_apps()]

    docs = run_store(gather)
    if as_json:
        echo_json(docs)
        return
    click.echo(f"keystore: {keystore_shown()}")
    click.echo(table(("ID", "NAME", "DEVICES", "KEYS", "MAX DEVICES", "MAX KEYS"), [
        (d["id"], d["name"], str(d["devices"]), str(d["keys"]), _limit(d["maxDevices"]),
         _limit(d["maxKeys"])) for d in docs]))


@apps.command("show")
@click.argument("app_ref", metavar="APP")
@click.option("--json", "as_json", is_flag=True, help="Print the application as JSON.")
def show(app_ref: str, as_json: bool) -> None:
    """Show application APP (name or id)."""

    async def gather(ks: KeyStore) -> dict[str, Any]:
        return await _with_counts(ks, await ks.app(app_ref))

    doc = run_store(gather)
    if as_json:
        echo_json(doc)
        return
    fields = [("id", doc["id"]), ("name", doc["name"]), ("description", doc["description"]),
              ("devices", doc["devices"]), ("keys", doc["keys"]),
              ("max devices", _limit(doc["maxDevices"])), ("max keys", _limit(doc["maxKeys"])),
              ("created", doc["creationDate"]), ("updated", doc["lastUpdated"])]
    click.echo("\n".join(f"{name + ':':<13}{value if value is not None else '-'}"
                         for name, value in fields))


@apps.command("update")
@click.argument("app_ref", metavar="APP")
@click.option("--name", help="New name.")
@click.option("--description", help="New description ('' clears it).")
@click.option("--max-keys", type=click.IntRange(min=0), help="New key limit (0 = no limit).")
@click.option("--max-devices", type=click.IntRange(min=0),
              help="New device limit (0 = no limit).")
@click.option("--json", "as_json", is_flag=True, help="Print the application as JSON.")
def update(app_ref: str, name: str | None, description: str | None, max_keys: int | None,
           max_devices: int | None, as_json: bool) -> None:
    """Change application APP's name, description, key limit or device limit."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if description is not None:
        changes["description"] = description or None
    if max_keys is not None:
        changes["max_keys"] = max_keys
    if max_devices is not None:
        changes["max_devices"] = max_devices
    if not changes:
        raise click.UsageError(
            "nothing to change: give --name, --description, --max-keys or --max-devices")
    app = run_store(lambda ks: ks.update_app(app_ref, **changes))
    if as_json:
        echo_json(app.to_json())
    else:
        click.echo(f"updated application {app.name} (id {app.id})")


@apps.command("delete")
@click.argument("app_refs", nargs=-1, required=True, metavar="APP...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def delete(app_refs: tuple[str, ...], yes: bool) -> None:
    """Delete applications with all their keys and devices (their sessions are
    disconnected and their retained messages dropped by the running daemon)."""

    async def describe(ks: KeyStore) -> list[str]:
        lines = []
        for ref in app_refs:
            doc = await _with_counts(ks, await ks.app(ref))  # unknown: an error before asking
            lines.append(f"{doc['name']} ({doc['devices']} devices, {doc['keys']} keys)")
        return lines

    described = run_store(describe)
    confirm_or_abort(f"Delete {len(described)} application(s) with everything in them: "
                     f"{'; '.join(described)}?", yes)
    for app in run_store(lambda ks: ks.delete_apps(list(app_refs))):
        click.echo(f"deleted application {app.name} (id {app.id})")
