"""`fluxmesh up` keeps its children running: a dead stage is restarted with backoff, said so in
its log and the orchestrator's metrics; a child that keeps crashing ends `up` (fluxmesh.cli.restarts)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from fluxmesh.cli.restarts import Backoff, GaveUp, Restarter, describe_exit
from fluxmesh.cli.supervisor import Child, Cluster, free_port
from fluxmesh.client import Client
from mesh import NOT_SERVING, metric, wait_for_health, wait_until

FLUXMESH = [sys.executable, "-m", "fluxmesh.cli"]


def test_backoff_doubles_up_to_its_ceiling():
    backoff = Backoff(first=1.0, factor=2.0, longest=5.0)
    assert [backoff.delay(n) for n in range(6)] == [1.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_exits_are_described_by_code_or_signal():
    assert describe_exit(3) == "code 3"
    assert describe_exit(-9) == "signal SIGKILL"


def _cluster_of(*commands: list[str]) -> Cluster:
    """A cluster of plain processes (no fluxmesh server), for the restart rules alone."""
    cluster = Cluster()
    for n, command in enumerate(commands):
        process = subprocess.Popen(command)
        cluster.children.append(Child(f"child{n}", "-", process, command=command))
    return cluster


def _run_until(restarter: Restarter, done, timeout: float) -> None:
    def checked() -> bool:
        restarter.check()
        return done()

    wait_until(checked, timeout, what="the restarts", interval=0.01)


@pytest.mark.timeout(60)
def test_a_child_that_keeps_crashing_fast_is_given_up_on(caplog):
    crash = [sys.executable, "-c", "import sys; sys.exit(3)"]
    keeps = [sys.executable, "-c", "import time; time.sleep(60)"]
    with _cluster_of(crash, keeps) as cluster:
        restarter = Restarter(cluster, Backoff(first=0.1, factor=2.0, longest=0.3, stable=30.0, give_up_after=4))
        caplog.set_level("WARNING", logger="fluxmesh.cli.restarts")
        with pytest.raises(GaveUp, match=r"child0 exited 4 times in a row within 30s of starting \(last: code 3\)"):
            _run_until(restarter, lambda: False, timeout=30)
        assert restarter.restarts("child0") == 3 and restarter.restarts("child1") == 0
        delays = re.findall(r"child0 exited with code 3 after [\d.]+s; restarting in ([\d.]+)s", caplog.text)
        assert delays == ["0.1", "0.2", "0.3"]  # doubled, up to `longest`


@pytest.mark.timeout(60)
def test_a_child_that_ran_long_enough_starts_over_at_the_first_delay(caplog):
    lives = [sys.executable, "-c", "import time, sys; time.sleep(0.4); sys.exit(1)"]
    with _cluster_of(lives) as cluster:
        restarter = Restarter(cluster, Backoff(first=0.1, stable=0.3, give_up_after=2))
        caplog.set_level("WARNING", logger="fluxmesh.cli.restarts")
        _run_until(restarter, lambda: restarter.restarts("child0") >= 4, timeout=30)  # never gives up
        assert set(re.findall(r"restarting in ([\d.]+)s", caplog.text)) == {"0.1"}  # `first`, every time


@pytest.fixture(scope="module")
def up(dev_model, tmp_path_factory):
    """`fluxmesh up` in its own session (so a test can Ctrl-C its whole process group), its
    output in a file, its orchestrator's metrics on a port."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("up") / "up.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [*FLUXMESH, "up", "--model", str(dev_model), "--port", str(port), "--threads", "1"]
            + ["--metrics-port", str(metrics_port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    wait_for_health(address, timeout=180, process=process, output=log.read_text)
    yield process, address, metrics_port, log
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _children(pid: int) -> dict[str, int]:
    """The stage (or orchestrator) name -> pid of `up`'s children."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    named = (re.search(r"(\d+) .* serve (\w+)", line) for line in out.splitlines())
    return {match[2]: int(match[1]) for match in named if match}


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return metric(text, name, stage="denoiser")


@pytest.mark.timeout(240)
def test_a_killed_denoiser_is_restarted_and_the_orchestrator_follows(up):
    process, address, metrics_port, log = up
    restarts = "fluxmesh_stage_restarts_total"
    assert _metric(metrics_port, restarts) == 0.0
    before = _children(process.pid)
    os.kill(before["denoiser"], signal.SIGKILL)

    wait_for_health(address, NOT_SERVING, timeout=10, process=process, output=log.read_text)
    assert _metric(metrics_port, "fluxmesh_stage_serving") == 0.0
    wait_for_health(address, timeout=120, process=process, output=log.read_text)

    after = _children(process.pid)
    assert after["denoiser"] != before["denoiser"]
    assert {name: after[name] for name in ("encoder", "vae", "orchestrator")} == {
        name: before[name] for name in ("encoder", "vae", "orchestrator")
    }
    said = log.read_text()
    assert re.search(r"denoiser exited with signal SIGKILL after [\d.]+s; restarting in 1\.0s \(restart 1\)", said)
    assert "restarted denoiser (restart 1" in said
    assert _metric(metrics_port, restarts) == 1.0
    assert _metric(metrics_port, "fluxmesh_stage_serving") == 1.0
    # The orchestrator still holds the stage token of the first start: the new denoiser takes it.
    with Client(address, timeout=60) as client:
        result = client.generate("a fox after a restart", width=64, height=64, steps=2, seed=1)
    assert result.image_data


@pytest.mark.timeout(60)
def test_ctrl_c_stops_everything_and_restarts_nothing(up):
    """Runs last in this module: Ctrl-C reaches the whole process group (children too); `up`
    stops them all, exits 0 and restarts none."""
    process, _, _, log = up
    children = _children(process.pid)
    assert len(children) == 4
    said_before = log.read_text().count("restarting in")
    os.killpg(process.pid, signal.SIGINT)
    try:
        # Stopping is bounded by Cluster.stop's 10 s grace per SIGTERM round; the rest is slack
        # for a loaded CI machine (it once took over 45 s there; the log below says where).
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"up still running 120 s after Ctrl-C; its log ends:\n{log.read_text()[-3000:]}") from None
    assert code == 0
    assert log.read_text().count("restarting in") == said_before
    for pid in children.values():  # reaped by `up`: gone, not zombies
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
