"""`keybroker tokens ...`: admin tokens of the HTTP API (docs/api.md#tokens)."""

from __future__ import annotations

import click

from broker.cli.common import keystore_shown, run_store
from broker.cli.output import echo_json, table
from keystore.models import ApiToken
from keystore.scopes import ACTIONS, ALL, ALL_READ, DEFAULT_SCOPES
from keystore.validation import parse_when


@click.group()
def tokens() -> None:
    """Manage the admin tokens of the HTTP API (Authorization: Bearer TOKEN)."""


def _app_text(token: ApiToken) -> str:
    return token.app_id or "all"


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
    row, token = run_store(lambda ks: ks.create_token(
        name, app=app_ref, scopes=scopes or DEFAULT_SCOPES,
        expires_at=parse_when(expires) if expires is not None else None), create=True)
    if as_json:
        echo_json({**row.to_json(), "token": token})
        return
    click.echo(f"created token {row.name} (id {row.id}) for application(s) "
               f"{_app_text(row)}, scopes {', '.join(row.scopes)}")
    click.echo(f"token: {token}")
    click.echo("The token is shown this once; it is not stored and cannot be recovered.")


@tokens.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def list_(as_json: bool) -> None:
    """List admin tokens (never the tokens themselves)."""
    rows = run_store(lambda ks: ks.list_tokens())
    if as_json:
        echo_json([row.to_json() for row in rows])
        return
    click.echo(f"keystore: {keystore_shown()}")
    click.echo(table(("ID", "NAME", "APPLICATION", "SCOPES", "STATUS", "EXPIRES"), [
        (r.id, r.name, _app_text(r), ",".join(r.scopes), r.status,
         r.to_json()["expirationDate"] or "never") for r in rows]))


@tokens.command("show")
@click.argument("ref", metavar="TOKEN")
@click.option("--json", "as_json", is_flag=True, help="Print the token's row as JSON.")
def show(ref: str, as_json: bool) -> None:
    """Show admin token TOKEN (name or id)."""
    row = run_store(lambda ks: ks.get_token(ref))
    doc = row.to_json()
    if as_json:
        echo_json(doc)
        return
    fields = [("id", row.id), ("name", row.name), ("application", _app_text(row)),
              ("scopes", ", ".join(row.scopes)), ("status", row.status),
              ("created", doc["creationDate"]), ("expires", doc["expirationDate"] or "never")]
    click.echo("\n".join(f"{label + ':':<13}{value}" for label, value in fields))


@tokens.command("revoke")
@click.argument("refs", nargs=-1, required=True, metavar="TOKEN...")
def revoke(refs: tuple[str, ...]) -> None:
    """Revoke admin tokens (names or ids): they stop working at once."""
    for row in run_store(lambda ks: ks.revoke_tokens(list(refs))):
        click.echo(f"revoked token {row.name} (id {row.id})")
