"""Fixtures of the daemon tests."""

from __future__ import annotations

import pytest

from tests.support.harness import Client


@pytest.fixture(params=[4, 5], ids=["mqtt311", "mqtt5"])
def each_protocol(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Runs a test once with MQTT 3.1.1 clients and once with MQTT 5 clients: the protocol
    of every ``harness.Client`` that does not name its own. The client says the broker's
    answers in their 3.1.1 form under both (CONNACK 4 for 0x86, 5 for 0x87; SUBACK 0x80
    for any refusal), so the test's assertions hold for both."""
    monkeypatch.setattr(Client, "protocol", request.param)
    return int(request.param)
