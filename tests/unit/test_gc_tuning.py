"""The daemon's process tunes CPython's cyclic garbage collector once it is up
(broker.daemon.server.tune_garbage_collector): start-up objects frozen, young collections
rarer. Run in a subprocess: it changes process-wide state."""

from __future__ import annotations

import subprocess
import sys

from broker.daemon.server import GC_YOUNG_THRESHOLD

PROBE = """
import gc
from broker.daemon.server import tune_garbage_collector
before = gc.get_freeze_count()
tune_garbage_collector()
print(gc.get_threshold()[0], before, gc.get_freeze_count())
"""


def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    threshold, before, after = map(int, out)
    assert threshold == GC_YOUNG_THRESHOLD > 700  # CPython's default is 700
    assert before == 0 and after > 10_000  # the imported modules' objects, at least
