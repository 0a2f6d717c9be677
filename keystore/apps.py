"""Applications (tenants): every device and key belongs to exactly one; an operation on
devices or keys names its application (id or name; None = the one named "default")."""

from __future__ import annotations

import logging
from collections.abc import Iterable
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


def validate_max_keys(value: object) -> int | None:
    """None (the keystore's configured limit), 0 (no limit) or a positive count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"invalid max_keys {value!r}: must be 0 (no limit) or more")
    return value


class AppOps:
    backend: Backend
    max_keys: int
    default_app: str  # the application of calls that name none (name or id)

    async def app(self, ref: str | None = None) -> Application:
        """An application by id or name; None is ``default_app``."""
        if ref is not None and not isinstance(ref, str):
            raise ValidationError(f"invalid application {ref!r}: must be a name or an id")
        return await self.backend.load_app(self.default_app if ref is None else ref)

    async def create_app(self, name: str, *, description: str | None = None,
                         max_keys: int | None | Any = ...) -> Application:
        """A new application; ``max_keys`` defaults to the keystore's configured limit."""
        limit = self.max_keys if max_keys is ... else validate_max_keys(max_keys)
        app = await self.backend.insert_app(validate_app_name(name),
                                            validate_description(description), limit)
        log.info("created application %s (%s)", app.name, app.id)
        return app

    async def list_apps(self) -> list[Application]:
        return await self.backend.all_apps()

    async def update_app(self, ref: str, *, name: Any = ..., description: Any = ...,
                         max_keys: Any = ...) -> Application:
        """Change the given fields (``...`` leaves one alone)."""
        changes: dict[str, Any] = {}
        if name is not ...:
            changes["name"] = validate_app_name(name)
        if description is not ...:
            changes["description"] = validate_description(description)
        if max_keys is not ...:
            changes["max_keys"] = validate_max_keys(max_keys)
        return await self.backend.change_app(ref, changes)

    async def delete_apps(self, refs: Iterable[str]) -> list[Application]:
        """Delete applications with every key and device they hold (all, or none if one
        does not exist); a running daemon disconnects their sessions (change feed)."""
        apps = await self.backend.delete_apps(dedupe(as_str_list(refs, "applications")))
        log.info("deleted %d applications", len(apps))
        return apps

    def key_limit(self, app: Application) -> int:
        return self.max_keys if app.max_keys is None else app.max_keys
