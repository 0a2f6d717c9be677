"""The bench's load generator (scripts/benchlib), for tests that need clients behaving
like real ones at rates paho's threads cannot reach: publishers paced only by their
PUBACKs, subscribers that acknowledge at once."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from benchlib.burst import BurstResult, BurstSpec, Device, run_burst  # noqa: E402
from benchlib.flows import Cred  # noqa: E402
from benchlib.mqttload import Client  # noqa: E402

__all__ = ["BurstResult", "BurstSpec", "Client", "Cred", "Device", "run_burst"]
