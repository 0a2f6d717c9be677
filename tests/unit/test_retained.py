"""Retained messages sent after a SUBSCRIBE (broker.mqtt.retained), with a link whose
buffer the test controls (no sockets): they wait for room instead of tripping the
slow-consumer bound."""

from __future__ import annotations

import asyncio

from broker.core.audit import AuditLog
from broker.core.counters import FlowCounters
from broker.core.settings import Settings
from broker.mqtt.flow import FlowControl
from broker.mqtt.retained import Retained
from broker.mqtt.routing import Router
from broker.mqtt.session import ConnectionInfo, KeySession
from tests.support.links import FakeLink
from tests.support.waiting import async_wait_until


async def test_a_large_retained_qos0_message_waits_for_room_not_a_kick() -> None:
    kicked: list[str] = []
    settings = Settings()
    flow = FlowControl(settings, FlowCounters(), kicked.append)
    router = Router(settings, {}, AuditLog(None), flow)
    session = KeySession("dev", True, ConnectionInfo("tcp", "127.0.0.1", "127.0.0.1"))
    link = FakeLink(held=60_000)  # the previous message is still leaving
    session.link = link
    message = Retained("losant/dev/big", b"x" * 220_000, 0, ("d:dev", "r:"))
    sending = asyncio.ensure_future(router.retained.send_one(session, link, message, 0))
    await async_wait_until(lambda: link.checks)  # the sender has looked at the buffer
    assert not link.written and not kicked  # 60 KB + 220 KB would exceed 256 KiB: it waits
    assert not sending.done()
    link.held = 10_000  # the reader took most of it
    await asyncio.wait_for(sending, 1)
    assert len(link.written) == 1 and not kicked
