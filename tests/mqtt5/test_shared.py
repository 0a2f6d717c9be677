"""Shared subscriptions ``$share/GROUP/FILTER`` with members under different keys
(docs/mqtt5.md#what-is-supported): each message goes to one member, one whose key may read
it; groups never span applications; what a member leaving or going offline held goes to
the others; MQTT 3.1.1 clients may join; off, they are refused."""

from __future__ import annotations

import socket

import pytest

from tests.mqtt5.conftest import StartDaemon
from tests.support import mqtt_raw as raw
from tests.support.harness import Client, RunningBroker
from tests.support.mqtt5 import Client5, Device, device_key, offline, received_before
from tests.support.waiting import wait_until

GROUP = "$share/workers/jobs/#"
JOBS = [f"jobs/{n}" for n in range(10)]
PUBLISH, SUBACK = 3, 9


def member(broker: RunningBroker, device: str, **key_options: object) -> Client5:
    """An MQTT 5 member of the group, also subscribed to its own end-of-test topic."""
    key_options.setdefault("topic_mode", "all")
    client = Device(broker, device, **key_options).connect()
    assert client.subscribe(GROUP, 1) == 1
    assert client.subscribe(f"losant/{device}/end", 1) == 1
    return client


def jobs_until_end(client: Client) -> list[str]:
    """The jobs ``client`` got before its end message (published after every job)."""
    return [message.topic for message in received_before(client, b"end")]


def publish_jobs(feeder: Client5, topics: list[str], *members: str) -> None:
    for topic in topics:
        feeder.publish(topic, b"job", qos=1)
    for device in members:
        feeder.publish(f"losant/{device}/end", b"end", qos=1)


@pytest.fixture
def everyone(broker: RunningBroker) -> RunningBroker:
    for device in ("m1", "m2", "m3"):
        broker.ks("add_device", device)
    return broker


def test_each_message_goes_to_one_member(everyone: RunningBroker, feeder: Client5) -> None:
    with member(everyone, "m1", device_ids=["m1"]) as first, \
            member(everyone, "m2", device_ids=["m2"], topic_mode="only",
                   sub_topics=["jobs/#"]) as second:
        publish_jobs(feeder, JOBS, "m1", "m2")
        got_first, got_second = jobs_until_end(first), jobs_until_end(second)
    assert got_first and got_second  # both take a share ...
    assert sorted(got_first + got_second) == sorted(JOBS)  # ... and each job once


def test_a_member_whose_key_may_not_read_a_message_is_skipped(everyone: RunningBroker,
                                                              feeder: Client5) -> None:
    public = [f"jobs/public/{n}" for n in range(6)]
    private = [f"jobs/private/{n}" for n in range(6)]
    with member(everyone, "m1", device_ids=["m1"], topic_mode="only",
                sub_topics=["jobs/public/#"]) as narrow, \
            member(everyone, "m2", device_ids=["m2"]) as wide:
        publish_jobs(feeder, private + public, "m1", "m2")
        got_narrow, got_wide = jobs_until_end(narrow), jobs_until_end(wide)
    assert got_narrow and set(got_narrow) <= set(public)
    assert set(private) <= set(got_wide)
    assert sorted(got_narrow + got_wide) == sorted(public + private)


def test_a_message_no_member_may_read_goes_to_none(everyone: RunningBroker,
                                                   feeder: Client5) -> None:
    with member(everyone, "m1", device_ids=["m1"], topic_mode="only",
                sub_topics=["jobs/public/#"]) as narrow:
        publish_jobs(feeder, ["jobs/private/1", "jobs/public/1"], "m1")
        assert jobs_until_end(narrow) == ["jobs/public/1"]


def test_groups_never_span_applications(everyone: RunningBroker, feeder: Client5) -> None:
    """A group of the same name and filter in another application is another group: each
    application's messages go to its own members only."""
    plant = everyone.ks("create_app", "plant").id
    everyone.ks("add_device", "p-pub", app=plant)
    with member(everyone, "m1", device_ids=["m1"]) as ours, \
            member(everyone, "p1", app=plant, device_ids=["p1"]) as theirs, \
            Device(everyone, "p-pub", app=plant, device_ids=["p-pub", "p1"],
                   topic_mode="all").connect() as plant_feeder:
        publish_jobs(feeder, JOBS[:4], "m1")
        publish_jobs(plant_feeder, JOBS[4:], "p1")
        assert jobs_until_end(ours) == JOBS[:4]
        assert jobs_until_end(theirs) == JOBS[4:]


def raw_member(device: Device, *, expiry: int = 0, receive_maximum: int = 100,
               clean_start: bool = True) -> socket.socket:
    """``device`` on a raw socket (acknowledging nothing unless the test does); a member of
    the group unless it resumes a session."""
    sock, connack = raw.session5(device.daemon.port(), device.id, device.key, device.secret,
                                 clean_start=clean_start,
                                 properties=raw.props(1, SessionExpiryInterval=expiry,
                                                      ReceiveMaximum=receive_maximum))
    assert connack.code == 0
    if clean_start:
        sock.sendall(raw.subscribe5([(GROUP, 1)]))
        assert raw.reply5(raw.expect(sock, SUBACK)).codes == (1,)
    return sock


def test_what_a_leaving_member_held_goes_to_the_others(everyone: RunningBroker,
                                                       feeder: Client5) -> None:
    """m1 takes its share and acknowledges none of it, then its connection (and, its
    Session Expiry Interval being 0, its session) ends: m2 gets every job all the same."""
    leaving = raw_member(Device(everyone, "m1", topic_mode="all"))
    with member(everyone, "m2", device_ids=["m2"]) as staying:
        with leaving:
            for topic in JOBS:
                feeder.publish(topic, b"job", qos=1)
            held = [raw.publish_of(raw.expect(leaving, PUBLISH)).topic]
            while (packet := raw.read_packet(leaving, 0.3)) is not None:
                held.append(raw.publish_of(packet).topic)
        wait_until(lambda: "m1" not in everyone.broker.sessions)
        feeder.publish("losant/m2/end", b"end", qos=1)
        got = jobs_until_end(staying)
    assert set(held) <= set(got) and sorted(set(got)) == sorted(JOBS)


def test_what_waits_for_a_member_gone_offline_goes_to_the_others(everyone: RunningBroker,
                                                                 feeder: Client5) -> None:
    """m1 keeps its session but goes offline holding one job in flight (Receive Maximum 1)
    and more waiting: the waiting ones go to m2, the one in flight comes back to m1 when it
    returns; none is lost."""
    device = Device(everyone, "m1", topic_mode="all")
    with member(everyone, "m2", device_ids=["m2"]) as staying:
        with raw_member(device, expiry=60, receive_maximum=1) as away:
            for topic in JOBS:
                feeder.publish(topic, b"job", qos=1)
            in_flight = raw.publish_of(raw.expect(away, PUBLISH)).topic
        wait_until(lambda: offline(everyone, "m1"))
        feeder.publish("losant/m2/end", b"end", qos=1)
        got = jobs_until_end(staying)
    assert in_flight not in got and sorted(got + [in_flight]) == sorted(JOBS)
    with raw_member(device, expiry=60, clean_start=False) as back:
        again = raw.expect(back, PUBLISH)
        assert again.dup and raw.publish_of(again).topic == in_flight


def test_an_mqtt_311_client_may_join_a_group(everyone: RunningBroker, feeder: Client5) -> None:
    key, secret = device_key(everyone, "m3", topic_mode="all")
    with member(everyone, "m2", device_ids=["m2"]) as modern, \
            Client(everyone.port(), "m3", key, secret, protocol=4) as classic:
        assert classic.connect() == 0
        assert classic.subscribe(GROUP, 1) == 1
        assert classic.subscribe("losant/m3/end", 1) == 1
        publish_jobs(feeder, JOBS, "m2", "m3")
        got_modern, got_classic = jobs_until_end(modern), jobs_until_end(classic)
    assert got_modern and got_classic
    assert sorted(got_modern + got_classic) == sorted(JOBS)


def test_shared_subscriptions_off_are_refused_to_both_versions(
        daemon_with: StartDaemon) -> None:
    daemon = daemon_with(shared_subscriptions=False)
    key, secret = device_key(daemon, "m3", topic_mode="all")
    with Client(daemon.port(), "m3", key, secret, protocol=4) as classic:
        assert classic.connect() == 0
        assert classic.subscribe(GROUP, 1) == 0x80
    with Device(daemon, "m2", topic_mode="all").connect() as modern:
        assert modern.subscribe(GROUP, 1) == 0x9E


def test_a_slow_member_loses_the_group_nothing(daemon_with: StartDaemon) -> None:
    """m1 takes its share and acknowledges none of it: past its bounds (4 messages) the
    group's jobs go to m2, and once m1 is cut off as a slow consumer, what it held goes to
    m2 as well. Every job reaches a member that acknowledges it."""
    daemon = daemon_with(max_queued_messages=4, slow_consumer_timeout=1.0)
    jobs = [f"jobs/{n}" for n in range(30)]
    feeding = Device(daemon, "feeder", device_ids=[], all_devices=True, topic_mode="all")
    with raw_member(Device(daemon, "m1", topic_mode="all")) as stalled, \
            member(daemon, "m2", device_ids=["m2"]) as prompt, feeding.connect() as feeder:
        for topic in jobs:
            feeder.publish(topic, b"job", qos=1)
        held = raw.publish_of(raw.expect(stalled, PUBLISH)).topic  # m1 took a share
        kicks = daemon.broker.registry.kicks
        wait_until(lambda: kicks.get("slow_consumer", 0) == 1, 10.0,
                   "m1 cut off as a slow consumer")
        feeder.publish("losant/m2/end", b"end", qos=1)
        got = jobs_until_end(prompt)
    assert held in got
    assert sorted(set(got)) == sorted(jobs)
