"""The MQTT engine without sockets, for unit tests: a SessionRegistry (with the Router it
builds) over an audit file, sessions with real grants, and links whose buffers the test
controls (tests/support/links.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.core.audit import AuditLog
from broker.core.counters import FlowCounters
from broker.core.settings import Settings
from broker.mqtt import codec
from broker.mqtt.flow import FlowControl
from broker.mqtt.routing import Router
from broker.mqtt.session import ConnectionInfo, Grant, KeySession
from broker.mqtt.sessions import SessionObserver, SessionRegistry
from broker.policy import SessionPolicy
from broker.topics.mounts import mount_of
from keystore.models import AccessKey, AddressMode, KeyStatus, TopicMode
from tests.support.links import FakeLink

NOW = datetime(2025, 1, 1, tzinfo=UTC)
INFO = ConnectionInfo("tcp", "127.0.0.1", "127.0.0.1")
APP = "app-1"


def access_key(key: str = "k" * 32, devices: tuple[str, ...] = (), *,
               topic_mode: TopicMode = TopicMode.NONE, pub: tuple[str, ...] = (),
               sub: tuple[str, ...] = (), app_id: str = APP,
               expires_at: datetime | None = None) -> AccessKey:
    """A stored key for ``devices`` (none: every device of its application)."""
    return AccessKey(
        key=key, name=None, description=None, status=KeyStatus.ACTIVE, expires_at=expires_at,
        all_devices=not devices, device_ids=devices, device_tags=(),
        address_mode=AddressMode.ALL, addresses=(), topic_mode=topic_mode, pub_topics=pub,
        sub_topics=sub, created_at=NOW, updated_at=NOW, app_id=app_id)


def grant(key: AccessKey) -> Grant:
    """What an accepted CONNECT with ``key`` fixes for its session."""
    scope = frozenset(key.device_ids) if key.device_ids else None
    return Grant(key, SessionPolicy.build(key, scope, "losant"))


class Engine:
    """A registry and its router, as the daemon builds them (``settings`` overrides the
    defaults), with every audit line readable (``audit_events``) and the slow consumers
    flow control reported (``slow``)."""

    def __init__(self, tmp_path: Path, *, observers: tuple[SessionObserver, ...] = (),
                 **overrides: Any) -> None:
        self.settings = replace(Settings(), **overrides)
        self.audit_path = tmp_path / "audit.jsonl"
        self.audit = AuditLog(self.audit_path)
        self.slow: list[str] = []
        self.flow = FlowControl(self.settings, FlowCounters(), self.slow.append)
        self.registry = SessionRegistry(self.settings, self.audit, self.flow,
                                        observers=observers)
        self.router: Router = self.registry.router

    def session(self, client_id: str, key: AccessKey | None = None, *, clean: bool = True,
                online: bool = True) -> KeySession:
        """A session of ``key``'s application, registered; online through a FakeLink
        (``link_of``) unless ``online`` is False."""
        session = KeySession(client_id, clean, INFO)
        if key is not None:
            session.grant = grant(key)
            session.mount = mount_of(key.app_id)
        if online:
            session.link = FakeLink(0)
        self.registry.sessions[client_id] = session
        return session

    def subscribe(self, session: KeySession, *requests: tuple[str, int] | codec.Subscription,
                  check: Callable[[KeySession, str], str | None] | None = None) -> list[int]:
        """The codes of one SUBSCRIBE (MQTT 5 reason codes: the QoS granted, or why not;
        a 3.1.1 SUBACK says 0x80 for each refusal). A request is (filter, QoS), or a
        Subscription with its MQTT 5 options. ``check``: the policy (default: allow)."""
        subscriptions = [r if isinstance(r, codec.Subscription) else
                         codec.Subscription(r[0], r[1], False, False, 0) for r in requests]
        codes, _ = self.router.subscribe(session, subscriptions,
                                         check or (lambda _session, _filter: None))
        return codes

    def audit_events(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        lines = [json.loads(line) for line in self.audit_path.read_text().splitlines()]
        return [e for e in lines if event is None or e["event"] == event]

    def close(self) -> None:
        self.audit.close()


def link_of(session: KeySession) -> FakeLink:
    link = session.link
    assert isinstance(link, FakeLink)
    return link


class Journal:
    """A persistent session's journal (broker.state) recording the changes it is told of
    (those of its subscriptions and its end; its messages are the outbox's business)."""

    def __init__(self) -> None:
        self.changes: list[tuple[object, ...]] = []

    def saved(self, session: KeySession) -> None:
        self.changes.append(("saved", session.client_id))

    def subscribed(self, topic_filter: str, qos: int) -> None:
        self.changes.append(("subscribed", topic_filter, qos))

    def unsubscribed(self, topic_filter: str) -> None:
        self.changes.append(("unsubscribed", topic_filter))

    def dropped(self) -> None:
        self.changes.append(("dropped",))

    def messages_added(self, outbox: object) -> None: ...

    def message_changed(self, message: object) -> None: ...

    def message_removed(self, message: object) -> None: ...
