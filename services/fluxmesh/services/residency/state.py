"""Where a stage's weights are: on its device, in CPU memory, or not held at all.

Sequential mode shares one accelerator between the three stages: the orchestrator tells each
stage to load its weights before its turn and to release them after. This module is the stage's
side of that: it moves the engine's modules device <-> CPU or drops and re-reads them, refuses
model calls while the weights are not on the device, and keeps a log of every transition with
wall-clock times so anyone can check, from the stages' own reports, that no two stages ever
held weights on the device at once.

Transitions and model calls run on the stage's one model thread (`ModelWorker`), so a release
waits for the call in progress and a call never sees half-moved weights.

Freed memory has to really leave the process, or sequential mode saves nothing:
* CUDA: `torch.cuda.empty_cache()` hands the caching allocator's blocks back to the driver, so
  the next stage's *process* can use them.
* CPU: glibc keeps freed heap memory (any block below its mmap threshold, 32 MiB in fluxmesh
  processes: see fluxmesh.rpc.allocator) in the process; `malloc_trim(0)` returns it to the OS. Without it a released stage's
  RSS barely drops (measured in bench/placement_cpu.py).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from fluxmesh.contract import ReleaseTo, StartResidency, WeightState
from fluxmesh.rpc.allocator import trim_heap
from fluxmesh.rpc.errors import InvalidArgument, NotResident, ResourceExhausted
from fluxmesh.services.runtime.device import Device
from fluxmesh.services.runtime.memory import current_rss_bytes, module_bytes

__all__ = ["RESIDENT", "OFFLOADED", "RELEASED", "Residency", "StageWeights", "Transition", "residency_state"]

log = logging.getLogger(__name__)

RESIDENT, OFFLOADED, RELEASED = WeightState.resident, WeightState.offloaded, WeightState.released
MAX_TRANSITIONS = 1000


class StageWeights(Protocol):
    """What an engine offers so its weights can be moved or dropped."""

    device: Device

    def load_weights(self, device: torch.device) -> None:
        """Read the weights from the model files onto `device` (and rebind whatever uses them)."""

    def drop_weights(self) -> None:
        """Forget every reference to the weight modules so their memory can be freed."""

    def weight_modules(self) -> list[torch.nn.Module]:
        """The modules holding weights now (empty once dropped)."""


@dataclass(frozen=True)
class Transition:
    from_state: str
    to_state: str
    started_unix: float
    finished_unix: float

    @property
    def seconds(self) -> float:
        return self.finished_unix - self.started_unix


class Residency:
    """One stage's weights and their state. Call `load`/`release`/`require_resident` on the
    stage's model thread; `state`, `status` and `transitions` are safe from anywhere."""

    def __init__(self, stage: str, weights: StageWeights, initial: str = StartResidency.resident):
        if initial not in tuple(StartResidency):
            raise InvalidArgument("residency", f"{initial!r}; expected one of {', '.join(StartResidency)}")
        self.stage = stage
        self.weights = weights
        weights.residency = self  # what the stage's Info reports (residency_state)
        self.device = weights.device.torch_device
        self.state = RELEASED
        self._transitions: deque[Transition] = deque(maxlen=MAX_TRANSITIONS)
        self._lock = threading.Lock()  # appended on the model thread, read on the event loop
        initial = StartResidency(initial).state(self.device.type)
        if initial == RESIDENT:
            self.load()
        elif initial == OFFLOADED:
            with self._transition(OFFLOADED):
                self.weights.load_weights(torch.device("cpu"))

    # -- model thread ------------------------------------------------------------------------

    def require_resident(self) -> None:
        """Refuse a model call unless the weights are on the device. Weights are never loaded
        on demand: in sequential mode that would put two stages on the accelerator at once."""
        if self.state != RESIDENT:
            raise NotResident(f"{self.stage} stage: weights are {self.state}; call fluxmesh.v1.Residency/Load first")

    def load(self) -> float:
        """Put the weights on the device; returns the seconds it took (0 when already there)."""
        if self.state == RESIDENT:
            return 0.0
        with self._transition(RESIDENT) as done:
            try:
                if self.state == RELEASED:
                    self.weights.load_weights(self.device)
                else:
                    self._move(self.device)
            except torch.OutOfMemoryError as error:
                # Leave the device as we found it: whatever was moved goes back or away.
                if self.state == OFFLOADED:
                    self._move(torch.device("cpu"))
                else:
                    self.weights.drop_weights()
                _free_device_memory(self.device)
                raise ResourceExhausted(
                    f"{self.stage} stage: not enough {self.device} memory to load: {error}"
                ) from None
            except BaseException:
                if self.state == RELEASED:
                    self.weights.drop_weights()
                raise
        return done.seconds

    def release(self, to: ReleaseTo = ReleaseTo.auto) -> float:
        """Offload to CPU memory or drop the weights, as `to` says for this stage's device;
        returns the seconds it took."""
        target = to.state(self.device.type)
        if self.state == RELEASED or self.state == target:
            return 0.0
        with self._transition(target) as done:
            if target == OFFLOADED:
                self._move(torch.device("cpu"))
            else:
                self._drop()
                _trim_heap()
            _free_device_memory(self.device)
        return done.seconds

    # -- anywhere ----------------------------------------------------------------------------

    @property
    def transitions(self) -> list[Transition]:
        """Every transition so far (the last MAX_TRANSITIONS), oldest first."""
        with self._lock:
            return list(self._transitions)

    def weight_bytes(self) -> int:
        return module_bytes(*self.weights.weight_modules())

    def device_weight_bytes(self) -> int:
        return self.weight_bytes() if self.state == RESIDENT else 0

    def snapshot(self) -> dict:
        """The state and memory figures a Status/Info answer reports."""
        allocated = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        return {
            "stage": self.stage,
            "state": self.state,
            "device": str(self.device),
            "weight_bytes": self.weight_bytes(),
            "device_weight_bytes": self.device_weight_bytes(),
            "rss_bytes": current_rss_bytes(),
            "device_allocated_bytes": int(allocated),
        }

    # -- internals ---------------------------------------------------------------------------

    def _drop(self) -> None:
        """Drop the weights and make sure they are gone. Reference counting frees them at once
        unless they sit in a cycle (hooks, adapters); only then pay for a full gc.collect()
        (~0.3 s with torch and diffusers loaded)."""
        alive = [weakref.ref(module) for module in self.weights.weight_modules()]
        self.weights.drop_weights()
        if any(ref() is not None for ref in alive):
            gc.collect()
        if any(ref() is not None for ref in alive):
            log.warning("%s: released weights are still referenced somewhere; their memory is not freed", self.stage)

    def _move(self, device: torch.device) -> None:
        for module in self.weights.weight_modules():
            module.to(device)
        if device.type == "cuda" or self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copy is done before we say so

    @contextmanager
    def _transition(self, target: str) -> Iterator[_Clock]:
        clock = _Clock(time.time())
        source = self.state
        # Loaders may run under the worker's inference_mode; weights must be ordinary tensors
        # (LoRA adapters are injected into them later), as at start-up.
        with torch.inference_mode(False):
            yield clock
        self.state = target
        clock.finished = time.time()
        with self._lock:
            self._transitions.append(Transition(source, target, clock.started, clock.finished))
        log.info(
            "%s: %s -> %s in %.3fs (%.1f MiB of weights)",
            self.stage,
            source,
            target,
            clock.seconds,
            self.weight_bytes() / 2**20,
        )


def residency_state(engine: StageWeights) -> str:
    """The state an engine's weights are in, for StageInfo.residency."""
    residency = getattr(engine, "residency", None)
    if residency is not None:
        return residency.state
    return RESIDENT if engine.weight_modules() else RELEASED  # an engine nobody manages


@dataclass
class _Clock:
    started: float
    finished: float = 0.0

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. FLUXMESH_MALLOC_TRIM=0 turns it off, to measure
    what it is worth (bench/placement_cpu.py)."""
    if os.environ.get("FLUXMESH_MALLOC_TRIM", "1") != "0":
        trim_heap()
