"""The bench/ scripts keep working: no figure is asserted here (benchmarks are not timed tests),
but a script that no longer starts, or prints no figures, would leave the docs' numbers
unreproducible without anyone noticing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=BENCH, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_starts_and_explains_itself(script):
    done = _run(script, "--help")
    assert done.returncode == 0, done.stderr
    assert f"python bench/{script}" in done.stdout  # the docstring gives the command the docs quote


def test_the_transfer_bench_prints_both_allocator_settings():
    done = _run("transfer.py", "--repeats", "2", "--rounds", "1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("fluxmesh allocator setup: median") and "GB/s" in line for line in lines), lines
    assert any(line.startswith("glibc defaults") and "GB/s" in line for line in lines), lines
