"""The names of a stage's weight states, importable without torch (`fluxmesh serve --residency`
and `fluxmesh up` build their choices from them)."""

from __future__ import annotations

from enum import Enum

__all__ = ["InitialState", "RESIDENT", "OFFLOADED", "RELEASED", "STANDBY", "INITIAL_STATES"]


class InitialState(str, Enum):
    """Where a stage's weights are when it starts."""

    resident = "resident"  # on the stage's device
    offloaded = "offloaded"  # in CPU memory
    released = "released"  # not read until Residency.Load
    # Start-up only: what sequential mode's `--release-to auto` would leave the stage in — offloaded
    # on an accelerator (fast to load again), released on CPU (where "offloaded" frees nothing).
    standby = "standby"


RESIDENT, OFFLOADED, RELEASED, STANDBY = (state.value for state in InitialState)
INITIAL_STATES = tuple(state.value for state in InitialState)
