"""KeySession: everything the broker keeps about one MQTT session, as typed fields.

A session outlives its connections when the client asked for a persistent session
(clean_session = 0): its subscriptions (in the routing trie, by client id), its outgoing
QoS 1/2 messages (``outbox``) and the packet ids of QoS 2 messages received but not yet
released (``inflight_in``) survive a disconnect and are resumed by the next CONNECT with
the same client id; its ``journal`` (broker.state) is told of each change so that it also
survives a restart. amqtt's Session carried a ``transitions`` state machine, two asyncio
queues and a dict of extension attributes per connection; keybroker needs none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from amqtt.contexts import Action

from broker import policy
from broker.mqtt.flow import Congestion
from broker.mqtt.link import Link
from broker.mqtt.outbox import MessageProps, Outbox, OutboxJournal
from broker.policy import Decision, SessionPolicy
from keystore.models import AccessKey


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """Network facts about a connection, known before CONNECT is authenticated."""

    listener: str
    peer_ip: str
    client_ip: str


@dataclass(frozen=True, slots=True)
class Grant:
    """What an accepted CONNECT fixed for the whole session (scope resolved at CONNECT)."""

    key: AccessKey
    policy: SessionPolicy


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    connack: int
    key: str | None


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: MessageProps | None = None  # MQTT 5 Will properties carried to subscribers
    delay: int = 0  # MQTT 5 Will Delay Interval, seconds


# What one topic alias costs beside its topic's bytes (the table's entry).
ALIAS_OVERHEAD = 100


class ClientLimits:
    """What an MQTT 5 client announced at CONNECT, and the topic aliases it set: limits on
    what the broker sends it, and its own aliases (bounded by the broker's maximum, and
    counted in its session's bytes: ``alias_bytes``)."""

    __slots__ = ("receive_max", "max_packet", "aliases", "alias_bytes", "problem_info",
                 "connack")

    def __init__(self, receive_max: int, max_packet: int, problem_info: bool) -> None:
        self.receive_max = receive_max  # QoS 1/2 it takes unacknowledged (Receive Maximum)
        self.max_packet = max_packet  # bytes of the largest packet it takes (0: no limit)
        self.aliases: dict[int, str] = {}  # its Topic Aliases (client to broker)
        self.alias_bytes = 0  # what they hold: their topics' bytes + ALIAS_OVERHEAD each
        self.problem_info = problem_info  # reason strings on acknowledgements too
        self.connack = b""  # the properties of the CONNACK that accepts it (until sent)

    def alias_cost(self, alias: int, topic: str) -> int:
        """``alias_bytes`` once ``alias`` stands for ``topic``."""
        old = self.aliases.get(alias)
        before = len(old.encode()) + ALIAS_OVERHEAD if old is not None else 0
        return self.alias_bytes - before + len(topic.encode()) + ALIAS_OVERHEAD


class SessionJournal(OutboxJournal, Protocol):
    """Records a persistent session's changes for the saved state (broker.state): its
    outbox's messages, and these."""

    def saved(self, session: KeySession) -> None:
        """Its key, connection facts, disconnect time or incoming QoS 2 ids changed."""

    def subscribed(self, topic_filter: str, qos: int) -> None: ...

    def unsubscribed(self, topic_filter: str) -> None: ...

    def dropped(self) -> None:
        """The session is forgotten, with everything held for it."""


NO_IDS: frozenset[int] = frozenset()
NO_GRANT = Decision(False, "not_authenticated")


class KeySession:
    __slots__ = (
        "client_id", "clean_session", "conn", "will", "keep_alive", "username", "password",
        "grant", "mount", "refusal", "auth_started", "link", "kicked", "suppress_will",
        "outbox", "inflight_in", "restored_in", "present", "bucket", "denials", "disconnected_at",
        "retained_filters", "retained_sending", "journal", "congestion", "dropped",
        "version", "expiry", "limits", "clean_start",
    )

    def __init__(self, client_id: str, clean_session: bool, conn: ConnectionInfo,
                 journal: SessionJournal | None = None) -> None:
        self.client_id = client_id
        self.clean_session = clean_session
        self.conn = conn  # network facts of the connection that last authenticated it
        self.will: Will | None = None
        self.keep_alive = 0  # seconds of silence tolerated (0 = no limit)
        # Credentials exist only between reading CONNECT and authenticating it.
        self.username: str | None = None
        self.password: str | None = None
        self.grant: Grant | None = None  # set by the auth plugin on success
        # The session's application as the prefix of its topics inside the broker: every
        # application's topics are mounted apart, so tenants never meet (see routing).
        self.mount = ""
        self.refusal: Refusal | None = None  # set by the auth plugin on failure
        self.auth_started = 0.0  # loop time the CONNECT's key was read
        self.link: Link | None = None  # the live connection's sending side; None offline
        self.kicked: str | None = None  # why it is being disconnected, once decided
        self.suppress_will = False
        self.journal = journal  # persistent sessions, when the broker state is kept
        self.outbox = Outbox(journal)  # outgoing QoS 1/2: in flight and waiting
        # QoS 2 packet ids received, PUBREL pending (None: none; an empty set is 216 bytes)
        self.inflight_in: set[int] | None = None
        # Those of them read back from the broker state after a restart: a crash may have
        # lost the PUBREL that released one, so a new PUBLISH (DUP 0) reusing it is new.
        self.restored_in: frozenset[int] = NO_IDS
        self.present = False  # CONNACK session-present: a stored session was resumed
        self.bucket: tuple[float, float] | None = None  # publish-rate token bucket
        self.denials: tuple[float, int, int] | None = None  # audit throttle (start, n, dropped)
        self.disconnected_at: float | None = None  # wall clock, for session expiry
        # Filters whose retained messages are still to be sent (paced; see routing).
        self.retained_filters: dict[str, int] = {}
        self.retained_sending = False
        # Past its bounds while online: who waits for it to drain (broker.mqtt.flow).
        self.congestion: Congestion | None = None
        self.dropped = 0  # messages dropped while offline and full, this episode (logged)
        self.version = 4  # protocol level of its connection: 4 (MQTT 3.1.1) or 5
        # Seconds it outlives its connection (MQTT 5 Session Expiry Interval, within the
        # server's maximum); None: the server's session_expiry (MQTT 3.1.1, persistent).
        self.expiry: float | None = None
        self.limits: ClientLimits | None = None  # MQTT 5 only
        self.clean_start = clean_session  # the CONNECT discards a stored session

    @property
    def online(self) -> bool:
        return self.link is not None

    def decide(self, topic: str, action: Action) -> Decision:
        """May this session publish to, subscribe to or receive ``topic``? An in-memory
        answer from its grant (docs/access.md)."""
        grant = self.grant
        if grant is None:
            return NO_GRANT
        if action is Action.RECEIVE:
            return policy.check_receive(grant.policy, topic)
        if action is Action.PUBLISH:
            return policy.check_publish(grant.policy, topic)
        return policy.check_subscribe(grant.policy, topic)

    def audit_fields(self, key: str | None = None) -> dict[str, Any]:
        """The audit fields identifying its connection (public key id, never a secret);
        ``key`` names the key when it has no grant yet (a refused CONNECT)."""
        conn, grant = self.conn, self.grant
        return {
            "key": key if key is not None else (grant.key.key if grant else None),
            "app": grant.key.app_id if grant else None,
            "client_id": self.client_id,
            "client_ip": conn.client_ip,
            "peer_ip": conn.peer_ip,
            "listener": conn.listener,
        }

    def __repr__(self) -> str:
        state = "online" if self.link is not None else "offline"
        return f"KeySession({self.client_id!r}, {state})"


def session_expiry(requested: int, maximum: int) -> float:
    """An MQTT 5 Session Expiry Interval within the server's maximum (``session_expiry``;
    0 there: none); 0xFFFFFFFF asks for never."""
    if requested == 0xFFFFFFFF:
        return float(maximum) if maximum else float("inf")
    return float(min(requested, maximum) if maximum else requested)
