"""The console's pages: applications, access keys (list, generate, secret once, detail),
devices. Each handler takes a signed-in ``Page`` (broker.console.web) and calls the same
keystore operations as the HTTP API."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs, urlencode

from aiohttp import web

from broker.console.forms import (
    blank_key_form,
    key_form_of,
    read_key_form,
    restriction_summary,
    split_list,
)
from broker.console.sessions import Reveal, reveal_later
from broker.console.web import Page
from broker.services.metrics import Observability
from keystore.errors import KeybrokerError, ValidationError
from keystore.models import AccessKey, KeyStatus
from keystore.validation import parse_tag

PER_PAGE = 50


async def _form(page: Page) -> Any:
    return await page.request.post()  # read (and cached) by the CSRF check already


# --- applications ----------------------------------------------------------------------------


async def apps(page: Page) -> web.StreamResponse:
    listed = await page.console.visible_apps(page.token)
    counts = {a.id: (await page.console.keystore.count_keys(app=a.id),
                     await page.console.keystore.count_devices(app=a.id)) for a in listed}
    return page.render("apps.html", apps=listed, counts=counts)


async def create_app(page: Page) -> web.StreamResponse:
    form = await _form(page)
    created = await page.console.keystore.create_app(
        str(form.get("name", "")).strip(),
        description=str(form.get("description", "")).strip() or None)
    page.targets["app"] = created.id
    return page.back(f"/console/apps/{created.id}/keys",
                     f"Created application {created.name}.")


async def delete_app(page: Page) -> web.StreamResponse:
    assert page.app is not None
    form = await _form(page)
    if str(form.get("confirm", "")) != page.app.name:
        page.targets["changed"] = "no"
        return page.back("/console/apps", f"Not deleted: type the name {page.app.name!r} "
                                          "to confirm.")
    await page.console.keystore.delete_apps([page.app.id])
    return page.back("/console/apps", f"Deleted application {page.app.name} with its keys "
                                      "and devices.")


async def app_home(page: Page) -> web.StreamResponse:
    return page.back(page.app_url("/keys"))


# --- access keys -----------------------------------------------------------------------------


def _page_number(page: Page) -> int:
    text = page.request.query.get("page", "0")
    if not re.fullmatch(r"[0-9]{1,6}", text):  # isdigit() also takes "²"
        return 0
    return int(text)


def _list_query(filter_text: str, advanced: str) -> Any:
    if advanced:
        try:
            return json.loads(advanced)
        except ValueError as exc:
            raise ValidationError(f"invalid advanced query: not JSON ({exc})") from None
        except RecursionError:
            raise ValidationError("invalid advanced query: nested too deeply") from None
    if filter_text:
        glob = filter_text if any(c in filter_text for c in "*?") else f"*{filter_text}*"
        # Keys and ids are lowercase hex, so they are found whatever the case typed.
        return {"$or": [{"name": {"$like": glob}}, {"key": {"$like": glob.lower()}},
                        {"id": filter_text.lower()}]}
    return None


async def keys(page: Page) -> web.StreamResponse:
    query = page.request.query
    filter_text, advanced = query.get("filter", "").strip(), query.get("query", "").strip()
    number = _page_number(page)
    error = None
    try:
        found, total = await page.console.keystore.page_keys(
            _list_query(filter_text, advanced), sort="creationDate", descending=True,
            offset=number * PER_PAGE, limit=PER_PAGE, app=page.app_id)
    except ValidationError as exc:
        found, total, error = [], 0, str(exc)
    here = {"filter": filter_text, "query": advanced}
    pages = {
        "previous": urlencode({**here, "page": number - 1}) if number else None,
        "next": urlencode({**here, "page": number + 1})
        if (number + 1) * PER_PAGE < total else None,
    }
    return page.render("keys.html", keys=found, total=total, number=number, pages=pages,
                       filter_text=filter_text, advanced=advanced, error=error,
                       summary=restriction_summary, back=urlencode({**here, "page": number}))


async def new_key(page: Page) -> web.StreamResponse:
    return page.render("key_new.html", form=blank_key_form())


async def create_key(page: Page) -> web.StreamResponse:
    form = read_key_form(await _form(page), page.console.api.settings.device_prefix,
                         create=True)
    if form.valid:
        try:
            key, secret = await page.console.keystore.create_key(app=page.app_id,
                                                                 **form.options)
        except KeybrokerError as exc:
            form.error_from(exc)
        else:
            return _reveal(page, key, secret)
    return page.render("key_new.html", 400, form=form)


def _reveal(page: Page, key: AccessKey, secret: str) -> web.Response:
    """Keep the secret for one view of the 'created' page (never in a URL)."""
    ticket = reveal_later(page.session, Reveal(key.id, key.key, secret))
    page.targets.update(key=key.key, action="applicationKeys.post")
    return page.back(page.app_url(f"/keys/{key.id}/created?{urlencode({'ticket': ticket})}"))


async def key_created(page: Page) -> web.StreamResponse:
    ticket = page.request.query.get("ticket", "")
    reveal = page.session.reveals.pop(ticket, None)
    key_id = page.request.match_info["applicationKeyId"]
    if reveal is None or reveal.key_id != key_id:
        return page.render("key_created.html", reveal=None, key_id=key_id)
    return page.render("key_created.html", reveal=reveal, key_id=key_id)


async def _key(page: Page) -> AccessKey:
    return await page.console.keystore.get_key_by_id(
        page.request.match_info["applicationKeyId"], app=page.app_id)


async def key_detail(page: Page) -> web.StreamResponse:
    key = await _key(page)
    return page.render("key.html", key=key, form=key_form_of(key),
                       summary=restriction_summary(key))


async def edit_key(page: Page) -> web.StreamResponse:
    key = await _key(page)
    raw = await _form(page)
    form = read_key_form(raw, page.console.api.settings.device_prefix, create=False)
    ks = page.console.keystore
    status = str(raw.get("status", key.status.value))
    if status not in (KeyStatus.ACTIVE.value, KeyStatus.INACTIVE.value):
        form.errors["form"] = f"invalid status {status[:40]!r}: active or inactive"
    if form.valid:  # everything checked before anything is written
        options = {name: form.options[name] for name in (
            "name", "description", "address_mode", "addresses", "topic_mode", "pub_topics",
            "sub_topics", "expires_at")}
        try:
            key = await ks.update_key(key.key, app=key.app_id, **options)
            if status != key.status.value:
                (key,) = await ks.set_status([key.key], status, app=key.app_id)
        except KeybrokerError as exc:
            form.error_from(exc)
        else:
            return page.back(page.app_url(f"/keys/{key.id}"), "Saved.")
    form.values["devices"] = key_form_of(key).values["devices"]
    return page.render("key.html", 400, key=key, form=form, summary=restriction_summary(key))


def _ending(page: Page, keys: list[str]) -> str:
    """What deactivating or deleting these keys ends, from the broker's live sessions."""
    live = sum(page.console.api.live_connections(k) for k in keys)
    if not live:
        return f"No device is connected with {'it' if len(keys) == 1 else 'them'} now."
    return f"This ends {live} live connection{'' if live == 1 else 's'} now."


async def key_status(page: Page) -> web.StreamResponse:
    """The list's status switch: the form names the status it asks for (a stale page
    cannot flip a key the other way); activating takes one click, deactivating a
    confirmation that says how many live connections it ends."""
    key = await _key(page)
    form = await _form(page)
    back, wanted = str(form.get("back", "")), str(form.get("status", ""))
    if wanted not in (KeyStatus.ACTIVE.value, KeyStatus.INACTIVE.value):
        raise ValidationError(f"invalid status {wanted[:40]!r}: active or inactive")
    status = KeyStatus(wanted)
    if status is KeyStatus.INACTIVE and key.status is KeyStatus.ACTIVE and \
            form.get("confirm") != "yes":
        return page.confirm("Deactivate access key",
                            f"Deactivate key {key.name or key.key}? {_ending(page, [key.key])} "
                            "Its devices cannot connect with it until it is activated again.",
                            page.app_url(f"/keys/{key.id}/status"),
                            page.app_url("/keys" + _list_state(back)),
                            items=[("status", status.value), ("back", back)])
    await page.console.keystore.set_status([key.key], status, app=key.app_id)
    return page.back(page.app_url("/keys" + _list_state(back)),
                     f"Key {key.name or key.key[:8]} is now {status.value}.")


def _list_state(sent: str) -> str:
    """The keys list's filter, query and page from a form field, re-encoded (never the
    field's text as it came: it goes into a Location header)."""
    state = parse_qs(sent)
    kept: dict[str, str] = {name: state[name][0] for name in ("filter", "query", "page")
                            if name in state}
    return "?" + urlencode(kept) if kept else ""


async def delete_key(page: Page) -> web.StreamResponse:
    key = await _key(page)
    form = await _form(page)
    if form.get("confirm") != "yes":
        return page.confirm("Delete access key",
                            f"Delete key {key.name or key.key}? {_ending(page, [key.key])} "
                            "It cannot be undone.",
                            page.app_url(f"/keys/{key.id}/delete"),
                            page.app_url(f"/keys/{key.id}"))
    await page.console.keystore.delete_keys([key.key], app=key.app_id)
    return page.back(page.app_url("/keys"), f"Deleted key {key.name or key.key[:8]}.")


async def bulk_keys(page: Page) -> web.StreamResponse:
    form = await _form(page)
    chosen = [str(k) for k in form.getall("key", [])]
    action = str(form.get("action", ""))
    if not chosen or action not in ("deactivate", "delete"):
        page.targets["changed"] = "no"
        return page.back(page.app_url("/keys"), "Select keys and an action first.")
    if action == "delete" and not page.allowed("applicationKey", "delete"):
        return page.render("error.html", 403, message=(
            f"Token {page.token.name!r} lacks a scope for applicationKey.delete."))
    if form.get("confirm") != "yes":
        verb = "Delete" if action == "delete" else "Deactivate"
        return page.confirm(f"{verb} {len(chosen)} keys",
                            f"{verb} these {len(chosen)} keys? {_ending(page, chosen)}",
                            page.app_url("/keys/bulk"), page.app_url("/keys"),
                            items=[("key", k) for k in chosen] + [("action", action)])
    ks, app = page.console.keystore, page.app_id
    page.targets.update(action="applicationKey.delete" if action == "delete" else
                        "applicationKey.patch", keys=str(len(chosen)))
    if action == "delete":
        await ks.delete_keys(chosen, app=app)
    else:
        await ks.set_status(chosen, KeyStatus.INACTIVE, app=app)
    return page.back(page.app_url("/keys"), f"{action.capitalize()}d {len(chosen)} keys.")


# --- devices ---------------------------------------------------------------------------------


async def devices(page: Page) -> web.StreamResponse:
    number = _page_number(page)
    found, total = await page.console.keystore.page_devices(
        sort="deviceId", offset=number * PER_PAGE, limit=PER_PAGE, app=page.app_id)
    online = {d.id: page.console.api.protocol(d.id) for d in found}
    return page.render("devices.html", devices=found, total=total, online=online,
                       number=number, more=(number + 1) * PER_PAGE < total)


def _tags(text: str) -> list[tuple[str, str]]:
    return [parse_tag(entry) for entry in split_list(text)]


async def create_device(page: Page) -> web.StreamResponse:
    form = await _form(page)
    device_id = str(form.get("device_id", "")).strip()
    device = await page.console.keystore.add_device(
        device_id, name=str(form.get("name", "")).strip() or None,
        tags=_tags(str(form.get("tags", ""))), app=page.app_id)
    page.targets["device_id"] = device.id
    return page.back(page.app_url(f"/devices/{device.id}"), f"Added device {device.id}.")


async def _device_page(page: Page, status: int = 200, **extra: Any) -> web.Response:
    device = await page.console.keystore.get_device(page.request.match_info["deviceId"],
                                                    app=page.app_id)
    keys_for = await page.console.keystore.list_keys({"deviceIds": device.id},
                                                     app=device.app_id)
    return page.render("device.html", status, device=device,
                       online=page.console.api.protocol(device.id), keys=keys_for,
                       tags=", ".join(f"{k}={v}" for k, v in device.tags), **extra)


async def device_detail(page: Page) -> web.StreamResponse:
    return await _device_page(page)


async def device_tags(page: Page) -> web.StreamResponse:
    device_id = page.request.match_info["deviceId"]
    form = await _form(page)
    await page.console.keystore.update_device(device_id, tags=_tags(str(form.get("tags", ""))),
                                              name=str(form.get("name", "")).strip() or None,
                                              app=page.app_id)
    return page.back(page.app_url(f"/devices/{device_id}"), "Saved.")


async def device_kick(page: Page) -> web.StreamResponse:
    device_id = page.request.match_info["deviceId"]
    await page.console.keystore.get_device(device_id, app=page.app_id)
    await page.console.keystore.request_kick(device_id)
    return page.back(page.app_url(f"/devices/{device_id}"),
                     f"Asked the daemon to disconnect {device_id}.")


async def device_delete(page: Page) -> web.StreamResponse:
    device_id = page.request.match_info["deviceId"]
    form = await _form(page)
    if form.get("confirm") != "yes":
        return page.confirm("Remove device",
                            f"Remove device {device_id}? Its session is "
                            "disconnected and its retained messages dropped.",
                            page.app_url(f"/devices/{device_id}/delete"),
                            page.app_url(f"/devices/{device_id}"))
    await page.console.keystore.remove_devices([device_id], app=page.app_id)
    return page.back(page.app_url("/devices"), f"Removed device {device_id}.")


async def device_key(page: Page) -> web.StreamResponse:
    device_id = page.request.match_info["deviceId"]
    form = await _form(page)
    key, secret = await page.console.keystore.create_key(
        device_ids=[device_id], name=str(form.get("name", "")).strip() or None,
        description=f"created in the console for device {device_id}",
        app=page.app_id)
    return _reveal(page, key, secret)


# --- status ----------------------------------------------------------------------------------


def _rate(observability: Observability, seconds: float) -> dict[str, float] | None:
    window = observability.history.since(seconds)
    if window is None:
        return None
    old, now = window
    elapsed = max(now.at - old.at, 1e-9)
    return {"seconds": elapsed, "in": (now.msgs_in - old.msgs_in) / elapsed,
            "out": (now.msgs_out - old.msgs_out) / elapsed, "refused": now.refused - old.refused}


async def status(page: Page) -> web.StreamResponse:
    observability = page.console.api.observability
    if observability is None:
        return page.render("error.html", 404, message="Metrics are off ([api] metrics).")
    now = observability.collector.sample()
    return page.render("status.html", now=now, minute=_rate(observability, 60),
                       five=_rate(observability, 300), fifteen=_rate(observability, 900),
                       lag=observability.probe.last)
