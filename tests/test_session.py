"""KeySession's plain-code state machine behaves like amqtt's `transitions` machine, and the
amqtt code KeyBroker copied or replaced is still the code it was copied from."""

from __future__ import annotations

import hashlib
import inspect

import pytest
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session
from hypothesis import given
from hypothesis import strategies as st
from transitions import MachineError

from broker.amqtt_broker import KeyProtocolHandler
from broker.session import KeySession

# KeyProtocolHandler.init_from_connect repeats amqtt 0.12.1's checks; KeySession replaces
# Session._init_states. If amqtt changes either, re-read it and update ours, then these.
COPIED = {
    BrokerProtocolHandler.init_from_connect: "036dc04c1133a18f",
    Session._init_states: "63c76988bf4f81ce",
}


@pytest.mark.parametrize("function", list(COPIED), ids=lambda f: f.__qualname__)
def test_amqtt_code_we_copied_is_unchanged(function: object) -> None:
    digest = hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]  # type: ignore[arg-type]
    assert digest == COPIED[function]  # type: ignore[index]


def run(session: Session, events: list[str]) -> list[tuple[str, str, bool]]:
    out = []
    for event in events:
        try:
            getattr(session.transitions, event)()
            raised = False
        except MachineError:
            raised = True
        out.append((event, session.transitions.state, raised))
    return out


@given(st.lists(st.sampled_from(["connect", "disconnect"]), max_size=12))
def test_same_transitions_as_amqtt(events: list[str]) -> None:
    theirs, ours = Session(), KeySession()
    assert run(ours, events) == run(theirs, events)
    assert ours.transitions.is_connected() == theirs.transitions.is_connected()
    assert (ours.last_connect_time is None) == (theirs.last_connect_time is None)
    assert (ours.last_disconnect_time is None) == (theirs.last_disconnect_time is None)


def test_the_handler_creates_key_sessions() -> None:
    source = inspect.getsource(KeyProtocolHandler.init_from_connect)
    assert "KeySession()" in source and "Session()" not in source.replace("KeySession()", "")
