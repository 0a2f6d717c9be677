"""`keybroker tokens ...`: admin tokens of the HTTP API (docs/api.md#tokens)."""

from __future__ import annotations

from typing import Any

import click

from broker.cli.common import keystore_shown, run_store
from broker.cli.output import echo_json, table
from keystore import KeyStore
from keystore.models import ApiToken
from keystore.scopes import ACTIONS, ALL, ALL_READ, DEFAULT_SCOPES
from keystore.validation import parse_when


@click.group()
def tokens() -> None:
    """Manage the admin tokens of the HTTP API (Authorization: Bearer TOKEN)."""


def _app_text(token: ApiToken, names: dict[str, str]) -> str:
    """The token's application by name ("all" for every one; the id of one since deleted)."""
    if token.app_id is None:
        return "all"
    return names.get(token.app_id, token.app_id)


def _doc(token: ApiToken, names: dict[str, str]) -> dict[str, Any]:
    """--json: the token's row (Losant's fields) with its application's name beside its id."""
    name = names.get(token.app_id) if token.app_id is not None else None
    return {**token.to_json(), "applicationName": name}


async def _app_names(ks: KeyStore) -> dict[str, str]:
    return {app.id: app.name for app in await ks.list_apps()}


@tokens.command("create")
@click.option("--name", required=True, help="A name for the token (unique).")
@click.option("--app", "app_ref", metavar="APP",
              help="Bind the token to this application (name or id); default: all.")
@click.option("--scope", "scopes", multiple=True, metavar="SCOPE",
              help=f"Repeatable; default {ALL}. Also {ALL_READ}, RESOURCE.* or "
                   f"RESOURCE.ACTION (resources: {', '.join(ACTIONS)}).")
@click.option("--expires", help="Expiry, ISO-8601 (no offset = UTC); default: never.")
@click.option("--json", "as_json", is_flag=True, help="Print the token and its row as JSON.")
def create(name: str, app_ref: str | None, scopes: tuple[str, ...], expires: str | None,
           as_json: bool) -> None:
    """Create an admin token. It is printed this once: only its hash is stored."""
    async def make(ks: KeyStore) -> tuple[tuple[ApiToken, str], dict[str, str]]:
        made = await ks.create_token(
            name, app=app_ref, scopes=scopes or DEFAULT_SCOPES,
            expires_at=parse_when(expires) if expires is not None else None)
        return made, await _app_names(ks)

    (row, token), names = run_store(make, create=True)
    if as_json:
        echo_json({**_doc(row, names), "token": token})
        return
    click.echo(f"created token {row.name} (id {row.id}) for application(s) "
               f"{_app_text(row, names)}, scopes {', '.join(row.scopes)}")
    click.echo(f"token: {token}")
    click.echo("The token is shown this once; it is not stored and cannot be recovered.")


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(as_json: bool) -> None:
    """List admin tokens (never the tokens themselves)."""
    async def gather(ks: KeyStore) -> tuple[list[ApiToken], dict[str, str]]:
        return await ks.list_tokens(), await _app_names(ks)

    rows, names = run_store(gather)
    if as_json:
        echo_json([_doc(row, names) for row in rows])
        return
    click.echo(f"keystore: {keystore_shown()}")
    click.echo(table(("ID", "NAME", "APPLICATION", "SCOPES", "STATUS", "EXPIRES"), [
        (r.id, r.name, _app_text(r, names), ",".join(r.scopes), r.status,
         r.to_json()["expirationDate"] or "never") for r in rows]))


@tokens.command("show")
@click.argument("ref", metavar="TOKEN")
@click.option("--json", "as_json", is_flag=True, help="Print the token's row as JSON.")
def show(ref: str, as_json: bool) -> None:
    """Show admin token TOKEN (name or id)."""
    async def gather(ks: KeyStore) -> tuple[ApiToken, dict[str, str]]:
        return await ks.get_token(ref), await _app_names(ks)

    row, names = run_store(gather)
    doc = _doc(row, names)
    if as_json:
        echo_json(doc)
        return
    fields = [("id", row.id), ("name", row.name), ("application", _app_text(row, names)),
              ("scopes", ", ".join(row.scopes)), ("status", row.status),
              ("created", doc["creationDate"]), ("expires", doc["expirationDate"] or "never")]
    click.echo("\n".join(f"{label + ':':<13}{value}" for label, value in fields))


@tokens.command("revoke")
@click.argument("refs", nargs=-1, required=True, metavar="TOKEN...")
def revoke(refs: tuple[str, ...]) -> None:
    """Revoke admin tokens (names or ids): they stop working at once."""
    for row in run_store(lambda ks: ks.revoke_tokens(list(refs))):
        click.echo(f"revoked token {row.name} (id {row.id})")
