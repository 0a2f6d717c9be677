"""Two real `keybroker authsvc` replicas on one keystore, for the request/response tests of
both engines' contracts (no engine needed: the requests are shaped like the ones RabbitMQ
3.10 and EMQX 5 send). Every module runs once on an SQLite file and once on a PostgreSQL
database (``replicas`` is parametrised by backend)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from keystore import KeyStore
from tests.conftest import BACKENDS, keystore_on
from tests.support.authsvc import Replica, authsvc_config, on_keystore

T = TypeVar("T")
# The shared replicas refuse many CONNECTs from 127.0.0.1 on purpose: the guard must not
# ban it (tests of the guard start a replica of their own).
MAX_FAILURES = 1000


@dataclass
class Replicas:
    db: str  # an SQLite file or a PostgreSQL URL
    work: Path  # the replicas' directory (configs, logs, audit trails)
    a: Replica
    b: Replica
    audit: list[Path]

    def store(self, action: Callable[[KeyStore], Awaitable[T]]) -> T:
        """Run ``action`` on the shared keystore (another process, as the CLI would)."""
        return on_keystore(self.db, action)

    def texts(self) -> str:
        """Everything the replicas wrote: logs and audit trails."""
        out = self.a.log_text() + self.b.log_text()
        return out + "".join(p.read_text() for p in self.audit if p.exists())


@pytest.fixture(scope="module", params=BACKENDS)
def replicas(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    work = tmp_path_factory.mktemp("authsvc")
    audit = [work / "a-audit.jsonl", work / "b-audit.jsonl"]
    with keystore_on(request, request.param, work) as db:
        a = Replica(work, "a", authsvc_config(db, audit[0], max_failures=MAX_FAILURES))
        b = Replica(work, "b", authsvc_config(db, audit[1], max_failures=MAX_FAILURES))
        try:
            a.start()
            b.start()
            yield Replicas(db, work, a, b, audit)
        finally:
            a.stop()
            b.stop()


def fields(**values: Any) -> dict[str, str]:
    return {name.replace("__", "."): str(value) for name, value in values.items()}
