"""Applications (tenants): every device and key belongs to exactly one; an operation on
devices or keys names its application (id or name; None = the one named "default").

An application has two limits of the same shape: how many keys (``max_keys``,
``maxKeys`` in JSON) and how many devices (``max_devices``, ``maxDevices``) it may hold.
Each is one integer, 0 for no limit, as Losant's schemas type their numbers (never
null): an application made without one gets the configured ``[keystore] max_keys`` /
``max_devices``. Only an application that never set one stores none (NULL: ``default``,
made by the migrations, and, for devices, every application older than the device
limit), and follows the configured limit: every application this module returns
carries the limits in force.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from keystore.backend import Backend
from keystore.errors import ValidationError
from keystore.models import Application
from keystore.validation import as_str_list, dedupe, validate_description, validate_key_name

log = logging.getLogger(__name__)

DEFAULT_APP = "default"  # the application of commands that name none (and of old keystores)
MAX_APP_NAME = 255


def validate_app_name(name: object) -> str:
    checked = validate_key_name(name, "application name")
    if checked is None:
        raise ValidationError("invalid application name None: a name is required")
    return checked


def validate_limit(value: object, name: str) -> int:
    """A limit (``name``: max_keys, max_devices): 0 (no limit) or a positive count."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"invalid {name} {value!r}: must be 0 (no limit) or more")
    return value


class AppOps:
    backend: Backend
    max_keys: int  # the limits of applications that set none
    max_devices: int
    default_app: str  # the application of calls that name none (name or id)

    async def app(self, ref: str | None = None) -> Application:
        """An application by id or name; None is ``default_app``."""
        if ref is not None and not isinstance(ref, str):
            raise ValidationError(f"invalid application {ref!r}: must be a name or an id")
        return self._in_force(
            await self.backend.load_app(self.default_app if ref is None else ref))

    async def create_app(self, name: str, *, description: str | None = None,
                         max_keys: int | Any = ..., max_devices: int | Any = ...) -> Application:
        """A new application; a limit left out is the keystore's configured one."""
        keys = self.max_keys if max_keys is ... else validate_limit(max_keys, "max_keys")
        devices = (self.max_devices if max_devices is ...
                   else validate_limit(max_devices, "max_devices"))
        app = await self.backend.insert_app(validate_app_name(name),
                                            validate_description(description), keys, devices)
        log.info("created application %s (%s)", app.name, app.id)
        return self._in_force(app)

    async def list_apps(self) -> list[Application]:
        return [self._in_force(app) for app in await self.backend.all_apps()]

    async def update_app(self, ref: str, *, name: Any = ..., description: Any = ...,
                         max_keys: Any = ..., max_devices: Any = ...) -> Application:
        """Change the given fields (``...`` leaves one alone)."""
        changes: dict[str, Any] = {}
        if name is not ...:
            changes["name"] = validate_app_name(name)
        if description is not ...:
            changes["description"] = validate_description(description)
        if max_keys is not ...:
            changes["max_keys"] = validate_limit(max_keys, "max_keys")
        if max_devices is not ...:
            changes["max_devices"] = validate_limit(max_devices, "max_devices")
        return self._in_force(await self.backend.change_app(ref, changes))

    async def delete_apps(self, refs: Iterable[str]) -> list[Application]:
        """Delete applications with every key and device they hold (all, or none if one
        does not exist); a running daemon disconnects their sessions (change feed)."""
        apps = await self.backend.delete_apps(dedupe(as_str_list(refs, "applications")))
        log.info("deleted %d applications", len(apps))
        return [self._in_force(app) for app in apps]

    def key_limit(self, app: Application) -> int:
        return self.max_keys if app.max_keys is None else app.max_keys

    def device_limit(self, app: Application) -> int:
        return self.max_devices if app.max_devices is None else app.max_devices

    def _in_force(self, app: Application) -> Application:
        """``app`` with the limits that apply to it (see the module's docstring)."""
        if app.max_keys is not None and app.max_devices is not None:
            return app
        return replace(app, max_keys=self.key_limit(app), max_devices=self.device_limit(app))
