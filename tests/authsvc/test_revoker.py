"""The revoker's reading of the change feed (broker/authsvc/revoker.py), in process on a
real SQLite keystore, with an engine that records what it was asked to close: a key
revoked while the keystore fails to answer the check is still revoked, on the next tick."""

from __future__ import annotations

from pathlib import Path

from broker.authsvc.engines import EngineApi, Kicked
from broker.authsvc.revoker import Revoker
from broker.core.audit import AuditLog
from keystore import KeyStore
from keystore.errors import UnavailableError


class RecordingEngine:
    """What the revoker calls of an EngineApi, recorded."""

    name = "emqx"

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    async def kick_key(self, key: str, reason: str) -> list[Kicked]:
        self.asked.append((key, reason))
        return [Kicked(f"conn-{len(self.asked)}", key, "d", "127.0.0.1")]

    async def kick_clients(self, client_ids: set[str], reason: str) -> list[Kicked]:
        return []

    async def reset_session(self, client_id: str, vhost: str | None) -> int:
        return 0


async def test_a_key_check_that_fails_is_tried_again(tmp_path: Path) -> None:
    async with KeyStore.open(tmp_path / "k.db") as keystore:
        await keystore.add_device("d")
        key, _ = await keystore.create_key(device_ids=["d"])
        engine = RecordingEngine()
        engines: dict[str, EngineApi] = {"emqx": engine}  # type: ignore[dict-item]
        revoker = Revoker(keystore, engines, AuditLog(None), interval=60)
        await revoker.start()
        try:
            real = keystore.keys_by_id
            calls = 0

            async def away_once(ids: object) -> object:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise UnavailableError("keystore away (test)")
                return await real(ids)  # type: ignore[arg-type]

            keystore.keys_by_id = away_once  # type: ignore[method-assign]
            await keystore.set_status([key.key], "inactive")
            try:
                await revoker.tick()
            except UnavailableError:
                pass  # Periodic logs it and ticks again
            assert engine.asked == []
            await revoker.tick()
            assert engine.asked == [(key.key, "key_inactive")]
            assert revoker.kicks == {"emqx": 1}
        finally:
            await revoker.stop()
