"""The service's own rules, pure (docs/cluster.md): what the engines' requests add to
broker.policy. No I/O: the service reads the keystore, these decide.

* A later request of a connection is answered from its snapshot and its key as it is
  now: a key since deleted, deactivated or expired, a device since removed, or an
  address the key no longer allows refuses it (``check_connection``).
* Topics come in two forms. EMQX sends MQTT filters as the client wrote them. RabbitMQ
  sends AMQP routing keys: ``/`` became ``.``, ``+`` became ``*``. A ``.`` the client
  wrote is a ``.`` in the routing key too, so ``a.b`` and ``a/b`` are one topic inside
  RabbitMQ. The service reads every ``.`` as a level separator (``mqtt_form``) and decides
  on that reading, which is the topic RabbitMQ routes by; what a topic with ``.`` would
  mean to the daemon is therefore refused: a client id containing ``.`` is refused at
  CONNECT (its device topics would read as another device's), a key's ``only`` list
  filters containing ``.`` grant nothing, and its ``except`` list filters are read the
  way RabbitMQ routes them (``a.b/c`` excepts ``a/b/c``) so nothing slips past them.
* Resources (RabbitMQ): a connection may use its own subscription queues and read and
  write the MQTT exchange, nothing else.
* RabbitMQ asks about one CONNECT in two requests: the secret (/auth/user), then the
  admission (/auth/vhost), which carries none; the second is granted only after a recent
  success of the first for the same client id and key (``check_credential_check``).
* Applications: RabbitMQ's virtual host ``/`` is the application named ``default``, any
  other virtual host the application of that name; EMQX serves one configured
  application. Tenants never share a topic space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from datetime import datetime

from broker.policy import SessionPolicy, check_key_address
from broker.policy.decisions import ALLOW, DENY_EXPIRED, DENY_INACTIVE, DENY_IP, Decision
from keystore.apps import DEFAULT_APP
from keystore.backend import ConnectionRow
from keystore.models import AccessKey, CredentialCheck, KeyStatus, TopicMode

DEFAULT_VHOST = "/"
QUEUE_PREFIX = "mqtt-subscription-"  # RabbitMQ's MQTT plugin: <prefix><client id>qos0|1
QUEUE_SUFFIXES = ("qos0", "qos1")

DENY_NO_SESSION = Decision(False, "no_session")  # no snapshot, or another key's
DENY_SECRET_NOT_CHECKED = Decision(False, "secret_not_checked")  # admission without /auth/user
DENY_DEVICE_GONE = Decision(False, "device_deleted")
DENY_DOTTED_CLIENT_ID = Decision(False, "dotted_client_id")
DENY_WRONG_VHOST = Decision(False, "wrong_vhost")
DENY_WRONG_APPLICATION = Decision(False, "wrong_application")
DENY_NOT_MQTT = Decision(False, "not_mqtt")  # no client id: AMQP 0-9-1 or another protocol
DENY_RESOURCE = Decision(False, "resource_denied")
ALLOW_OWN_QUEUE = Decision(True, "own_queue")
ALLOW_EXCHANGE = Decision(True, "mqtt_exchange")


def policy_digest(key: AccessKey) -> str:
    """The key's topic settings as a digest: a connection admitted under other settings
    holds subscriptions the engine granted under them (see docs/cluster.md)."""
    text = json.dumps([key.topic_mode.value, list(key.pub_topics), list(key.sub_topics)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_credential_check(check: CredentialCheck | None, key: str, now: datetime,
                           window: float) -> Decision:
    """May an admission request that carries no secret (RabbitMQ's /auth/vhost) admit
    ``key`` for the client id of ``check``? Only when the key's secret was checked for that
    client id (/auth/user) within ``window`` seconds, on any replica: otherwise any allowed
    peer could admit any key, and reset a victim's session, without its secret."""
    if check is None or check.key != key or \
            abs((now - check.checked_at).total_seconds()) > window:
        return DENY_SECRET_NOT_CHECKED
    return ALLOW


def check_connection(row: ConnectionRow | None, username: str, now: datetime) -> Decision:
    """May a later request of the connection of this snapshot be granted at all?"""
    if row is None or row.snapshot.key != username:
        return DENY_NO_SESSION
    key = row.key
    if key.status != KeyStatus.ACTIVE:
        return DENY_INACTIVE
    if key.is_expired(now):
        return DENY_EXPIRED
    if row.device_app != key.app_id:
        return DENY_DEVICE_GONE
    if not check_key_address(key, row.snapshot.client_ip).allowed:
        return DENY_IP
    return ALLOW


# --- RabbitMQ ---------------------------------------------------------------------------


def mqtt_form(routing_key: str) -> str:
    """The MQTT filter (or topic) RabbitMQ's routing key stands for, every ``.`` read as
    a level separator and ``*`` as ``+``. ``#`` is ``#`` in both forms."""
    return "/".join("+" if word == "*" else word for word in routing_key.split("."))


def amqp_key(key: AccessKey) -> AccessKey:
    """The key with its custom-topic lists as RabbitMQ routes them (see the module
    docstring): ``only`` drops filters containing ``.``, ``except`` splits them."""
    if key.topic_mode is TopicMode.ONLY:
        keep = [f for f in key.pub_topics if "." not in f], \
            [f for f in key.sub_topics if "." not in f]
    elif key.topic_mode is TopicMode.EXCEPT:
        keep = [f.replace(".", "/") for f in key.pub_topics], \
            [f.replace(".", "/") for f in key.sub_topics]
    else:
        return key
    return replace(key, pub_topics=tuple(keep[0]), sub_topics=tuple(keep[1]))


def amqp_policy(key: AccessKey, scope: frozenset[str] | None,
                device_prefix: str) -> SessionPolicy:
    """``SessionPolicy.build`` for RabbitMQ's topic form."""
    return SessionPolicy.build(amqp_key(key), scope, device_prefix)


def check_client_id(client_id: str) -> Decision:
    """RabbitMQ: a device id with ``.`` would read as another device's topics."""
    return DENY_DOTTED_CLIENT_ID if "." in client_id else ALLOW


def app_of_vhost(vhost: str) -> str:
    """The application a RabbitMQ virtual host serves (its name)."""
    return DEFAULT_APP if vhost == DEFAULT_VHOST else vhost


def check_resource(resource: str, name: str, permission: str, client_id: str,
                   exchange: str) -> Decision:
    """RabbitMQ resources of an MQTT connection: its own subscription queues (any
    permission) and the MQTT exchange (read: bind its queues, write: publish)."""
    if resource == "queue" and name in {QUEUE_PREFIX + client_id + s for s in QUEUE_SUFFIXES}:
        return ALLOW_OWN_QUEUE
    if resource == "exchange" and name == exchange and permission in ("read", "write"):
        return ALLOW_EXCHANGE
    return DENY_RESOURCE


def session_queues(client_id: str) -> tuple[str, ...]:
    """The queues RabbitMQ keeps a client's subscriptions in."""
    return tuple(QUEUE_PREFIX + client_id + suffix for suffix in QUEUE_SUFFIXES)
