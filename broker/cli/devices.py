"""`keybroker devices ...`: register, tag and remove devices, and mint per-device keys."""

from __future__ import annotations

import click

from broker.cli.common import app_option, confirm_or_abort, keystore_shown, parse_tags, run_store
from broker.cli.output import device_details, device_table, echo_json, report_created, secret_file
from keystore import KeyStore
from keystore.models import Device, TopicMode


@click.group()
def devices() -> None:
    """Manage devices (an MQTT client id must be a registered device)."""


def print_device(device: Device, as_json: bool) -> None:
    if as_json:
        echo_json(device.to_json())
    else:
        click.echo(device_details(device))


@devices.command("add")
@app_option
@click.argument("device_id", metavar="ID")
@click.option("--name", help="Human-readable name.")
@click.option("--tag", "tags", multiple=True, metavar="K=V", help="Tag (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
def add(device_id: str, name: str | None, tags: tuple[str, ...], as_json: bool) -> None:
    """Register device ID."""
    parsed = parse_tags(tags)
    device = run_store(lambda ks: ks.add_device(device_id, name=name, tags=parsed), create=True)
    if as_json:
        echo_json(device.to_json())
    else:
        click.echo(f"added device {device.id}")


@devices.command("list")
@app_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(as_json: bool) -> None:
    """List devices."""
    found = run_store(lambda ks: ks.list_devices())
    if as_json:
        echo_json([d.to_json() for d in found])
        return
    click.echo(f"keystore: {keystore_shown()}")
    click.echo(device_table(found) if found else "no devices")


@devices.command("show")
@app_option
@click.argument("device_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
def show(device_id: str, as_json: bool) -> None:
    """Show one device."""
    print_device(run_store(lambda ks: ks.get_device(device_id)), as_json)


@devices.command("tag")
@app_option
@click.argument("device_id", metavar="ID")
@click.argument("tags", nargs=-1, required=True, metavar="K=V...")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
def tag(device_id: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Add tags to a device (a key may carry several values)."""
    parsed = parse_tags(tags)
    print_device(run_store(lambda ks: ks.tag_device(device_id, parsed)), as_json)


@devices.command("untag")
@app_option
@click.argument("device_id", metavar="ID")
@click.argument("specs", nargs=-1, required=True, metavar="K=V|K...")
@click.option("--json", "as_json", is_flag=True, help="Print the device as JSON.")
def untag(device_id: str, specs: tuple[str, ...], as_json: bool) -> None:
    """Remove tags: K=V removes that pair, K removes every value of K."""
    print_device(run_store(lambda ks: ks.untag_device(device_id, list(specs))), as_json)


@devices.command("remove")
@app_option
@click.argument("device_ids", nargs=-1, required=True, metavar="ID...")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove(device_ids: tuple[str, ...], yes: bool) -> None:
    """Remove devices (their connected sessions are disconnected)."""

    async def check(ks: KeyStore) -> None:
        for device_id in device_ids:
            await ks.get_device(device_id)  # unknown id: a clear error before asking

    if not yes:
        run_store(check)
    confirm_or_abort(f"Remove {len(device_ids)} device(s): {', '.join(device_ids)}?", yes)
    removed = run_store(lambda ks: ks.remove_devices(list(device_ids)))
    for device_id in removed:
        click.echo(f"removed device {device_id}")
    missing = sorted(set(device_ids) - set(removed))
    if missing:
        raise click.ClickException(f"unknown device(s): {', '.join(missing)}")


@devices.command("kick")
@app_option
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
def kick(device_ids: tuple[str, ...]) -> None:
    """Disconnect the live session of each device ID (the running daemon acts within ~1 s).

    The device may reconnect at once if its key still allows it: deactivate the key to
    keep it out."""

    async def request(ks: KeyStore) -> None:
        for device_id in device_ids:
            await ks.get_device(device_id)  # unknown ids are an error, nothing requested
        for device_id in device_ids:
            await ks.request_kick(device_id)

    run_store(request)
    for device_id in device_ids:
        click.echo(f"kick requested for device {device_id}")


@devices.command("key")
@app_option
@click.argument("device_id", metavar="ID")
@click.option("--name", help="Key name (unique among keys).")
@click.option("--json", "as_json", is_flag=True, help="Print the key and secret as JSON.")
@click.option(
    "--output", type=click.Path(dir_okay=False), help="Write key/secret to this new file (0600)."
)
def key(device_id: str, name: str | None, as_json: bool, output: str | None) -> None:
    """Create an access key scoped to device ID alone (no extra topics)."""
    with secret_file(output) as sink:
        created, secret = run_store(
            lambda ks: ks.create_key(name=name, device_ids=[device_id], topic_mode=TopicMode.NONE)
        )
        report_created(created, secret, as_json, sink)
