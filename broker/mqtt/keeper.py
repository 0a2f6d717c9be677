"""What the engine tells the broker state kept across restarts (broker.state.recorder
implements it; the engine runs without one when persistence is off). The engine only
marks what changed: a persistent session's journal, a retained message, and, with
``sync``, acknowledgements that wait until what their PUBLISH changed is saved."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from broker.mqtt.outbox import MessageProps
from broker.mqtt.session import SessionJournal


class RetainedMessage(Protocol):
    """What is saved of a retained message (broker.mqtt.retained.Retained)."""

    topic: str
    payload: bytes
    qos: int
    props: MessageProps | None

    @property
    def bucket(self) -> str: ...


class StateKeeper(Protocol):
    @property
    def sync(self) -> bool:
        """Acknowledge QoS 1/2 only once what the PUBLISH changed is saved."""

    def journal(self, client_id: str) -> SessionJournal:
        """The journal of a persistent session."""

    def retained_changed(self, mount: str, topic: str,
                         message: RetainedMessage | None) -> None: ...

    def after_commit(self, write: Callable[[bytes], None], packet: bytes) -> None:
        """``write(packet)`` once what was marked so far is saved."""
