"""Child `fluxmesh` processes die with the process that started them, even when it is SIGKILLed.

Linux's PR_SET_PDEATHSIG does it, but it has to be set in the child. Setting it from a
`preexec_fn` runs Python between fork and exec in a copy of a multi-threaded parent (gRPC's
and torch's threads), which can abort the child before it ever starts (seen as exit -6 in CI).
So the parent only names itself in the child's environment, the child is started with a plain
fork+exec, and the child sets the signal as the first thing it does, then checks that the
parent it was given is still its parent (it may have died in between).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "FLUXMESH_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child that must not outlive this process."""
    return {**os.environ, **(extra or {}), PARENT_PID_ENV: str(os.getpid())}


def die_with_parent_if_asked() -> None:
    """Called first thing by every `fluxmesh` command; does nothing unless a parent asked."""
    parent = os.environ.pop(PARENT_PID_ENV, None)  # not inherited by this process's own children
    if parent is None or not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # the parent died before the line above: nobody will signal
        os.kill(os.getpid(), signal.SIGTERM)
