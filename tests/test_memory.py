"""What a stage reports about its own memory on the CPU (StageInfo.peak_memory_bytes, rss_bytes)."""

from __future__ import annotations

import json
import subprocess
import sys

from fluxmesh.services.runtime.memory import process_memory

MIB = 2**20

# A parent that holds 768 MiB (written, so resident) starts a stage-like child, as `fluxmesh up`
# and the benchmarks start stages from a process that may be large.
PARENT = """
import subprocess, sys
held = b"\\x01" * (768 << 20)
child = "import json, torch; from fluxmesh.services.runtime.memory import peak_memory_bytes, process_memory; " \\
    "rss = process_memory().rss; print(json.dumps([peak_memory_bytes(torch.device('cpu')), rss]))"
print(subprocess.run([sys.executable, "-c", child], check=True, capture_output=True, text=True).stdout)
"""


def test_a_stage_reports_its_own_peak_not_the_process_that_started_it():
    out = subprocess.run([sys.executable, "-c", PARENT], check=True, capture_output=True, text=True, timeout=120)
    peak, rss = json.loads(out.stdout.strip().splitlines()[-1])
    # getrusage's ru_maxrss carried the parent's 768+ MiB into the child across fork + exec.
    # (rss is read before the peak: the peak only grows, so rss <= peak even if a page came between.)
    assert rss <= peak < 768 * MIB, (peak / MIB, rss / MIB)


def test_the_peak_can_be_reset_to_now():
    block = b"\x01" * (256 << 20)
    assert process_memory().rss >= len(block)
    del block
    high = process_memory().peak
    after = process_memory(reset_peak=True)
    assert after.peak < high - 200 * MIB, (after.peak / MIB, high / MIB)  # the freed block is no longer the peak
    assert after.peak >= after.rss > 0
