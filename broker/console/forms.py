"""The key form, read field by field (each error next to its field, the values kept), and
the one-line summaries of a key's restrictions shown in lists."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from keystore.errors import KeybrokerError
from keystore.models import AccessKey, AddressMode, TopicMode
from keystore.validation import (
    parse_tag,
    parse_when,
    validate_address,
    validate_custom_filter,
    validate_description,
    validate_device_id,
    validate_key_name,
)

TEXT_FIELDS = ("name", "description", "devices_mode", "devices", "address_mode", "addresses",
               "topic_mode", "pub", "sub", "expires")
DEVICE_MODES = ("all", "only")
ADDRESS_MODES = {"all": AddressMode.ALL, "only": AddressMode.ONLY, "except": AddressMode.EXCEPT}
TOPIC_MODES = {"none": TopicMode.NONE, "all": TopicMode.ALL, "only": TopicMode.ONLY,
               "except": TopicMode.EXCEPT}


def split_list(text: str) -> list[str]:
    """Comma- or line-separated entries, blanks dropped."""
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


@dataclass(slots=True)
class KeyForm:
    values: dict[str, str]  # as typed, to show again
    errors: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # keystore arguments when valid

    @property
    def valid(self) -> bool:
        return not self.errors

    def check(self, name: str, read: Callable[[], Any]) -> Any:
        try:
            return read()
        except KeybrokerError as exc:
            self.errors.setdefault(name, str(exc))
            return None

    def error_from(self, exc: KeybrokerError) -> None:
        """Place a refusal the keystore made after the form was read next to its field."""
        text = str(exc)
        where = ("devices" if "device" in text else "name" if "name" in text else
                 "addresses" if "address" in text else
                 "pub" if "topic" in text or "filter" in text else "form")
        self.errors.setdefault(where, text)


def blank_key_form(devices: str = "") -> KeyForm:
    return KeyForm({"name": "", "description": "", "devices_mode": "only" if devices else "all",
                    "devices": devices, "address_mode": "all", "addresses": "",
                    "topic_mode": "none", "pub": "", "sub": "", "expires": ""})


def key_form_of(key: AccessKey) -> KeyForm:
    """The edit form of an existing key (the device restriction is shown, not edited)."""
    modes = {v: k for k, v in ADDRESS_MODES.items()}
    topics = {v: k for k, v in TOPIC_MODES.items()}
    return KeyForm({
        "name": key.name or "", "description": key.description or "",
        "devices_mode": "all" if key.all_devices else "only",
        "devices": ", ".join([*key.device_ids, *(f"{k}={v}" for k, v in key.device_tags)]),
        "address_mode": modes[key.address_mode], "addresses": ", ".join(key.addresses),
        "topic_mode": topics[key.topic_mode], "pub": ", ".join(key.pub_topics),
        "sub": ", ".join(key.sub_topics),
        "expires": key.expires_at.isoformat().replace("+00:00", "Z") if key.expires_at else "",
    })


def read_key_form(raw: Mapping[str, Any], device_prefix: str, *, create: bool) -> KeyForm:
    """The keystore arguments of a submitted key form, or the errors by field."""
    form = KeyForm({name: str(raw.get(name, "")).strip() for name in TEXT_FIELDS})
    values, options = form.values, form.options
    options["name"] = form.check("name", lambda: validate_key_name(values["name"] or None))
    options["description"] = form.check(
        "description", lambda: validate_description(values["description"] or None))
    if create:
        _read_devices(form)
    address_mode = ADDRESS_MODES.get(values["address_mode"])
    if address_mode is None:
        form.errors["address_mode"] = f"invalid choice {values['address_mode']!r}"
    options["address_mode"] = address_mode
    options["addresses"] = [form.check("addresses", partial(validate_address, a))
                            for a in split_list(values["addresses"])]
    topic_mode = TOPIC_MODES.get(values["topic_mode"])
    if topic_mode is None:
        form.errors["topic_mode"] = f"invalid choice {values['topic_mode']!r}"
    options["topic_mode"] = topic_mode
    for name, option in (("pub", "pub_topics"), ("sub", "sub_topics")):
        options[option] = [form.check(name, partial(validate_custom_filter, f, device_prefix))
                           for f in split_list(values[name])]
    options["expires_at"] = form.check(
        "expires", lambda: parse_when(values["expires"], "expiry") if values["expires"]
        else None)
    if address_mode is AddressMode.ALL:
        options["addresses"] = []  # the list is ignored, not an error, with "all"
    elif not options["addresses"] and "addresses" not in form.errors:
        form.errors["addresses"] = "give at least one address or CIDR"
    if topic_mode in (TopicMode.NONE, TopicMode.ALL):
        options["pub_topics"], options["sub_topics"] = [], []
    elif not (options["pub_topics"] or options["sub_topics"]) and not \
            ({"pub", "sub"} & set(form.errors)):
        form.errors["pub"] = "give at least one publish or subscribe filter"
    return form


def _read_devices(form: KeyForm) -> None:
    mode = form.values["devices_mode"]
    if mode not in DEVICE_MODES:
        form.errors["devices_mode"] = f"invalid choice {mode!r}"
        return
    if mode == "all":
        return
    ids: list[str] = []
    tags: list[tuple[str, str]] = []
    for entry in split_list(form.values["devices"]):
        if "=" in entry:
            tags.append(form.check("devices", partial(parse_tag, entry)))
        else:
            ids.append(form.check("devices", partial(validate_device_id, entry)))
    if not ids and not tags and "devices" not in form.errors:
        form.errors["devices"] = "give at least one device id or key=value tag"
    form.options["device_ids"] = ids
    form.options["device_tags"] = tags


# --- summaries ---------------------------------------------------------------------------------


def devices_summary(key: AccessKey) -> str:
    if key.all_devices:
        return "All devices"
    parts = []
    if key.device_ids:
        count = len(key.device_ids)
        parts.append(f"{count} device{'s' if count != 1 else ''}")
    if key.device_tags:
        tags = ", ".join(f"{k}={v}" for k, v in key.device_tags)
        parts.append(f"tag{'s' if len(key.device_tags) != 1 else ''} {tags}")
    return ", ".join(parts)


def restriction_summary(key: AccessKey) -> str:
    """"3 devices, tag type=thermostat · IP: only 10.0.0.0/8 · Topics: only 2 pub / 1 sub"."""
    parts = [devices_summary(key)]
    if key.address_mode is not AddressMode.ALL:
        word = "only" if key.address_mode is AddressMode.ONLY else "all except"
        parts.append(f"IP: {word} {', '.join(key.addresses)}")
    if key.topic_mode is TopicMode.ALL:
        parts.append("Topics: all")
    elif key.topic_mode is not TopicMode.NONE:
        word = "only" if key.topic_mode is TopicMode.ONLY else "all except"
        parts.append(f"Topics: {word} {len(key.pub_topics)} pub / {len(key.sub_topics)} sub")
    return " · ".join(parts)
