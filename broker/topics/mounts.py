"""Applications' topics inside the broker: each application's are mounted under a prefix
of its own (its id), so tenants never meet; the prefix is never seen on the wire."""

from __future__ import annotations


def mount_of(app_id: str) -> str:
    """The prefix of an application's topics inside the broker."""
    return app_id + "/"
