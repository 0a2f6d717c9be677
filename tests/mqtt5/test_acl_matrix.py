"""The topic rules' matrix of tests/unit/test_policy.py (publish, receive and subscribe, for
each topic mode) through a real daemon, with MQTT 3.1.1 and with MQTT 5 clients: the
same answers under both, and MQTT 5 says each refusal (PUBACK and SUBACK 0x87)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keystore.models import TopicMode
from tests.support.harness import Client, RunningBroker
from tests.support.mqtt5 import Client5, device_key, received_before
from tests.unit.test_policy import MATRIX, PUB, SUB, SUBSCRIBE_MATRIX

NOT_AUTHORIZED = 0x87
SENTINEL = "losant/d1/sentinel"  # readable and publishable in every mode


def client_for(daemon: RunningBroker, device: str, protocol: int, **key_options: object,
               ) -> Client:
    key, secret = device_key(daemon, device, **key_options)
    client: Client = (Client5(daemon.port(), device, key, secret) if protocol == 5
                      else Client(daemon.port(), device, key, secret, protocol=4))
    assert client.connect() == 0
    return client


def received_until_sentinel(client: Client) -> set[str]:
    """The topics ``client`` received before the sentinel (published last, in order)."""
    return {message.topic for message in received_before(client, b"sentinel")}


@pytest.fixture
def matrix_daemon(broker: RunningBroker) -> RunningBroker:
    for device in ("d1", "d2", "opener"):
        broker.ks("add_device", device)
    return broker


@pytest.fixture(params=[4, 5], ids=["mqtt311", "mqtt5"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def opener(matrix_daemon: RunningBroker, protocol: int) -> Iterator[Client]:
    """Every device and every custom topic: publishes what the subject may receive, and
    watches what the subject may publish."""
    with client_for(matrix_daemon, "opener", protocol, device_ids=[], all_devices=True,
                    topic_mode="all") as client:
        yield client


@pytest.mark.parametrize("mode", list(TopicMode), ids=[m.value for m in TopicMode])
def test_the_policy_matrix_holds_through_the_daemon(matrix_daemon: RunningBroker,
                                                    opener: Client, protocol: int,
                                                    mode: TopicMode) -> None:
    index = list(TopicMode).index(mode)
    options: dict[str, object] = {"device_ids": ["d1", "d2"], "topic_mode": mode.value}
    if mode in (TopicMode.ONLY, TopicMode.EXCEPT):  # the lists of the others are empty
        options.update(pub_topics=PUB, sub_topics=SUB)
    with client_for(matrix_daemon, "d2", protocol, **options) as subscriber:
        for topic_filter, granted in SUBSCRIBE_MATRIX:
            code = subscriber.subscribe(topic_filter)
            assert (code == 0) is granted[index], topic_filter
            if protocol == 5 and not granted[index]:
                assert code == NOT_AUTHORIZED, topic_filter

    with client_for(matrix_daemon, "d1", protocol, **options) as subject:
        # What it may publish reaches the opener; the rest is refused.
        assert opener.subscribe("#") == 0
        for topic, publish, _ in MATRIX:
            answer = subject.publish(topic, b"x", qos=1)
            if protocol == 5:
                assert answer is not None and answer.code == (
                    0 if publish[index] else NOT_AUTHORIZED), topic
        subject.publish(SENTINEL, b"sentinel", qos=1)
        assert received_until_sentinel(opener) == {
            topic for topic, publish, _ in MATRIX if publish[index]}

        # What the opener publishes reaches it where it may read.
        assert subject.subscribe("#") == 0
        for topic, _, _ in MATRIX:
            opener.publish(topic, b"x", qos=1)
        opener.publish(SENTINEL, b"sentinel", qos=1)
        expected = {topic for topic, _, receive in MATRIX if receive[index]}
        assert received_until_sentinel(subject) == expected
