"""KeySession: amqtt's Session without a `transitions.Machine` per connection.

amqtt builds a full `transitions` state machine (three states, five transitions, two
callbacks) in every Session's constructor; profiling the daemon under a CONNECT storm
showed that construction alone at about a third of the event loop's time. The machine is
tiny, so SessionStates implements the same behaviour as plain code: states new /
connected / disconnected; ``connect`` from new or disconnected; ``disconnect`` from any
state (re-entering disconnected runs its callback again, as `transitions` does for
reflexive transitions); anything else raises transitions' MachineError, which amqtt code
catches. tests/test_session.py checks it against amqtt's own machine.
"""

from __future__ import annotations

from amqtt.session import Session
from transitions import MachineError

NEW, CONNECTED, DISCONNECTED = "new", "connected", "disconnected"


class SessionStates:
    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = NEW

    def connect(self) -> bool:
        if self.state == CONNECTED:
            raise MachineError(f"Can't trigger event connect from state {self.state}!")
        self.state = CONNECTED
        self._session._on_enter_connected()
        return True

    def disconnect(self) -> bool:
        self.state = DISCONNECTED
        self._session._on_enter_disconnected()
        return True

    def is_new(self) -> bool:
        return self.state == NEW

    def is_connected(self) -> bool:
        return self.state == CONNECTED

    def is_disconnected(self) -> bool:
        return self.state == DISCONNECTED


class KeySession(Session):
    def _init_states(self) -> None:
        self.transitions = SessionStates(self)
