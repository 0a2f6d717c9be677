"""scripts/bench end to end on a real keybroker daemon: the load generator delivers
messages through an access-key session and the JSON has the documented shape.
No assertion on speed (tests never assert on wall-clock figures)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def run_bench(tmp_path: Path, workload: str, *args: str, timeout: float
              ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`scripts/bench --quick` of one workload on keybroker alone: it must succeed; its
    JSON report."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, str(BENCH), "--quick", "--only", workload, "--brokers", "keybroker",
         *args, "--json-out", str(out)],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(out.read_text())


def test_bench_quick_qos0_keybroker(tmp_path: Path) -> None:
    proc, report = run_bench(tmp_path, "qos0", "--measure", "0.5", timeout=40)
    assert set(report) >= {"meta", "results", "notes", "table"}
    assert report["meta"]["brokers"] == ["keybroker"]
    assert report["meta"]["workloads"] == ["qos0"]
    assert {"nproc", "cpu", "python"} <= set(report["meta"]["machine"])
    row = report["results"]["qos0"]
    assert {"label", "unit", "values", "details", "ratios", "target"} <= set(row)
    detail = row["details"]["keybroker"]
    assert "error" not in detail, detail
    assert detail["delivered_in_window"] > 0
    assert row["values"]["keybroker"] > 0
    assert detail["subscribers"]["sub_granted"] == [0]
    assert detail["subscribers"]["first_topic"] == "bench/load"
    assert "keybroker/amqtt" in row["ratios"]
    assert "1 pub -> 1 sub, QoS 0" in proc.stdout


def test_a_quick_run_shows_figures_and_judges_no_target(tmp_path: Path) -> None:
    proc, report = run_bench(tmp_path, "policy", timeout=60)
    rows = report["results"]
    assert rows and all(row["values"]["keybroker"] > 0 for row in rows.values())
    assert all(row["target"] == "<= 2000 ns" for row in rows.values())  # kept, for reference
    assert all(row["target_met"] is None for row in rows.values())
    header = next(line for line in proc.stdout.splitlines() if line.startswith("workload"))
    assert [cell.strip() for cell in header.split("|")] == ["workload", "unit", "keybroker"]
    assert "| NO" not in proc.stdout and "| yes" not in proc.stdout
    assert "quick run: a look, not a verdict" in proc.stdout


def test_quick_runs_the_scale_workloads_only_when_named(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    loader = importlib.machinery.SourceFileLoader("bench_script", str(BENCH))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, loader.name, bench)  # its dataclasses look it up
    monkeypatch.setattr(sys, "path", list(sys.path))  # it puts scripts/ on the path
    loader.exec_module(bench)
    scale = {"burst", "many", "storm", "api", "metrics"}
    quick = bench.workloads_to_run(None, quick=True)
    assert quick and scale.isdisjoint(quick)
    assert scale <= set(bench.workloads_to_run(None, quick=False))
    assert bench.workloads_to_run(["storm"], quick=True) == ["storm"]


def test_bench_quick_api_rows(tmp_path: Path) -> None:
    _, report = run_bench(tmp_path, "api", "--measure", "0.3", timeout=90)
    results = report["results"]
    assert "api_create" in results, report["notes"]
    assert results["api_create"]["details"]["keybroker"]["requests"] == 200
    for row in ("api_create", "api_list_page_p99", "api_auth_device_p99", "api_qos0_idle",
                "api_qos0_loaded", "api_qos0_ratio"):
        assert results[row]["values"]["keybroker"] > 0, row
    loaded = results["api_qos0_loaded"]["details"]["keybroker"]
    assert loaded["api_req_per_s"] > 0 and loaded["api_errors"] == 0
    assert results["api_list_page_p99"]["target"] == "p99 <= 30 ms"


def test_bench_quick_storm_brings_every_session_back(tmp_path: Path) -> None:
    """The reconnect storm: persistent sessions with a subscription each, a daemon restart
    (SIGTERM), every device back at once, with its session and unbanned."""
    _, report = run_bench(tmp_path, "storm", timeout=120)
    results = report["results"]
    detail = results["storm_back"]["details"]["keybroker"]
    assert detail["subscribe_refused"] == 0
    assert detail["first"]["connections"] == detail["storm"]["connections"] == 3000
    assert detail["first"]["session_present"] == 0
    assert results["storm_missing"]["values"]["keybroker"] == 0  # all 3,000 session_present
    assert results["storm_bans"]["values"]["keybroker"] == 0
    assert any("restored 0 retained messages and 3000 persistent sessions" in line
               for line in detail["daemon_log"])
