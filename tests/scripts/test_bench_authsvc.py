"""scripts/bench_authsvc end to end, its decisions part (no RabbitMQ needed): a real
replica answers every request type correctly and the JSON has the documented shape. No
assertion on speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench_authsvc"


def test_bench_authsvc_decisions(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(BENCH), "--quick", "--only", "decisions", "--keys", "1000",
         "--db", str(tmp_path / "ks.db"), "--json-out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["meta"]["keys"] == 1000 and report["meta"]["keystore"] == "sqlite"
    rows = report["decisions"]
    assert {"rabbitmq /auth/user", "rabbitmq /auth/topic read", "emqx /emqx/authn",
            "emqx /emqx/authz subscribe"} <= set(rows)
    for name, row in rows.items():
        assert row["requests"] == 300 and row["errors"] == 0, name
        assert 0 < row["p50_ms"] <= row["p99_ms"], name
