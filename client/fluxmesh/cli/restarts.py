"""Keep `fluxmesh up`'s children running: restart one that dies, with backoff, and give up on
one that keeps crashing.

A child that exits (a stage killed by the OOM killer, a crash in a driver) is started again
with the command and environment it first had (fluxmesh.cli.supervisor.Cluster.restart): the
same port, so the orchestrator's channels reconnect by themselves, and the same random stage
token, so the orchestrator's credential still opens it. Meanwhile the orchestrator's health is
NOT_SERVING (fluxmesh.orchestrator.monitor) and it counts the stage's return in
`fluxmesh_stage_restarts_total`.

Hand-written rather than delegated to systemd or a process manager: `up` is the one-command
local deployment, and its children carry a secret in their environment that only `up` holds.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fluxmesh.cli.supervisor import Child, Cluster

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """When to restart a child that exited, and when to stop trying.

    A crash within `stable` seconds of a (re)start is *fast*: the delays of consecutive fast
    crashes double from `first` up to `longest`; `give_up_after` of them in a row and the child
    is left dead (GaveUp). A child that ran `stable` seconds or more starts over at `first`.
    """

    first: float = 1.0
    factor: float = 2.0
    longest: float = 30.0
    stable: float = 60.0
    give_up_after: int = 5

    def delay(self, fast_crashes: int) -> float:
        """Seconds to wait before restarting after `fast_crashes` fast crashes in a row (0: none)."""
        return min(self.first * self.factor ** max(fast_crashes - 1, 0), self.longest)


class GaveUp(RuntimeError):
    """A child crashed fast too often in a row; the message says which and how."""


def describe_exit(code: int) -> str:
    """`code 3` or `signal SIGKILL` for a Popen returncode."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class _Watch:
    fast_crashes: int = 0
    restart_at: float | None = None  # when a dead child is due to start again
    restarts: int = 0


@dataclass
class Restarter:
    """Watches a cluster's children; `check()` handles whatever happened since the last call."""

    cluster: Cluster
    backoff: Backoff = Backoff()
    clock: Callable[[], float] = time.monotonic
    _watches: dict[str, _Watch] = field(default_factory=dict)

    def restarts(self, name: str) -> int:
        return self._watch(name).restarts

    def _watch(self, name: str) -> _Watch:
        return self._watches.setdefault(name, _Watch())

    def check(self) -> None:
        """Restart the children whose delay is over; schedule those that just died. Raises GaveUp."""
        now = self.clock()
        for child in self.cluster.children:
            watch = self._watch(child.name)
            if watch.restart_at is not None:
                if now >= watch.restart_at:
                    self.cluster.restart(child)
                    watch.restart_at = None
                    watch.restarts += 1
                    log.warning("restarted %s (restart %d, pid %d)", child.name, watch.restarts, child.process.pid)
            elif child.process.poll() is not None:
                self._died(child, watch, now)

    def _died(self, child: Child, watch: _Watch, now: float) -> None:
        ran = now - child.started
        watch.fast_crashes = watch.fast_crashes + 1 if ran < self.backoff.stable else 0
        exit = describe_exit(child.process.returncode)
        if watch.fast_crashes >= self.backoff.give_up_after:
            raise GaveUp(
                f"{child.name} exited {watch.fast_crashes} times in a row within {self.backoff.stable:.0f}s "
                f"of starting (last: {exit}); giving up"
            )
        delay = self.backoff.delay(watch.fast_crashes)
        watch.restart_at = now + delay
        log.warning(
            "%s exited with %s after %.1fs; restarting in %.1fs (restart %d)",
            child.name,
            exit,
            ran,
            delay,
            watch.restarts + 1,
        )

    def run(self, interval: float = 0.5) -> None:
        """Check for ever (until KeyboardInterrupt or GaveUp)."""
        while True:
            self.check()
            time.sleep(interval)
