"""Fixtures of the MQTT 5 tests: daemons with the settings a test needs, devices, keys."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import RunningBroker, broker_settings
from tests.support.mqtt5 import Client5, Device

StartDaemon = Callable[..., RunningBroker]


@pytest.fixture
def daemon_with(daemon_with: StartDaemon, tmp_path: Path) -> StartDaemon:
    """The root ``daemon_with`` (tests/conftest.py), each daemon on files of its own
    (tmp_path/daemon-N): an MQTT 5 test may run two side by side."""
    numbers = itertools.count(1)

    def start(**overrides: Any) -> RunningBroker:
        work = tmp_path / f"daemon-{next(numbers)}"
        work.mkdir()
        return daemon_with(broker_settings(work), **overrides)

    return start


@pytest.fixture
def broker(daemon_with: StartDaemon) -> RunningBroker:
    """A daemon with the default settings."""
    return daemon_with()


@pytest.fixture
def feeder(broker: RunningBroker) -> Iterator[Client5]:
    """An MQTT 5 client whose key may publish to (and read) every device and custom topic."""
    everything = Device(broker, "feeder", device_ids=[], all_devices=True, topic_mode="all")
    with everything.connect() as client:
        yield client


@pytest.fixture(params=[True, False], ids=["reason-strings", "no-reason-strings"])
def reason_strings(request: pytest.FixtureRequest) -> bool:
    """``[mqtt] reason_strings`` on, then off."""
    return bool(request.param)


@pytest.fixture
def refusing(daemon_with: StartDaemon, reason_strings: bool) -> RunningBroker:
    """A daemon with reason strings on, then one with them off."""
    return daemon_with(reason_strings=reason_strings)


Says = Callable[[str | None, str], None]


@pytest.fixture
def says(reason_strings: bool) -> Says:
    """``says(reason, expected)``: with reason strings on, a refusal's reason string is
    exactly ``expected`` (the rule class and nothing more: no key id, list, device id or
    topic fits in it); with them off, there is none."""

    def check(reason: str | None, expected: str) -> None:
        assert reason == (expected if reason_strings else None)

    return check
