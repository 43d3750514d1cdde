"""`--compile`: torch.compile for a stage's model, warmed up before the stage reports SERVING.

Choices, measured on the tiny model (docs/benchmarks.md):
* The denoiser compiles its repeated blocks (diffusers' `compile_repeated_blocks`, "regional
  compilation"): the 19+38 FLUX blocks share two compiled graphs, so compiling costs two
  block graphs instead of the whole transformer, for the same speed.
* `dynamic=True`: batch rows (1 to --max-batch, more with true CFG), image tokens (the size)
  and text tokens (256, 512, Redux) are symbolic from the first compile. Only size 1 is
  specialised by torch, so warm-up runs batch 1 and batch 2 (and --max-batch, to check it
  compiles nothing). A size outside --warmup-sizes often compiles nothing (a 3-row 384x384
  forward after a 256x256 warm-up did not), but not always: torch may have guarded on a size
  (a 96x80 request after a 64x64 warm-up of the tiny model recompiled both block graphs), and
  that request pays for the compile, counted in `recompiles`. With `dynamic=None` (automatic)
  every new dimension recompiled once: 8 graphs instead of 4, twice the warm-up.
* Requests that run outside the shared loop (step caching's hooks, Kontext and Control's own
  pipeline loop) run eager (`eager()`): diffusers' cache hooks change the blocks' forward per
  request, which would recompile (or break the graph) on every such request.

Every compile is counted through torch's compile-event callbacks (`torch._dynamo.callback`):
those during warm-up and those after it (`recompiles`: a request waited for a compile), with
the seconds they took; both go to Prometheus and to the stage's Info.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from prometheus_client import Counter

from fluxmesh import contract
from fluxmesh.rpc.errors import InvalidArgument

__all__ = [
    "CompileOptions",
    "CompileWatch",
    "check_warmup_size",
    "compile_blocks",
    "compile_module",
    "eager",
    "parse_sizes",
]

log = logging.getLogger(__name__)

COMPILES = Counter("fluxmesh_compiles", "torch.compile graph compiles, warm-up and later", ["stage"])
RECOMPILES = Counter(
    "fluxmesh_recompiles", "torch.compile compiles after warm-up (a request waited for one)", ["stage"]
)
COMPILE_SECONDS = Counter("fluxmesh_compile_seconds", "Seconds spent in torch.compile", ["stage"])


@dataclass(frozen=True)
class CompileOptions:
    """What `--compile`, `--warmup-sizes` and `--max-lora-rank` asked for."""

    enabled: bool = False
    warmup_sizes: tuple[tuple[int, int], ...] = ((1024, 1024),)  # (width, height)
    max_lora_rank: int = 64  # the hot-swap slot's rank (loras/hotswap.py)


def parse_sizes(text: str, field: str = "--warmup-sizes") -> tuple[tuple[int, int], ...]:
    """`"256x256,512x768"` -> ((256, 256), (512, 768)): width x height, comma-separated."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        width, sep, height = part.lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
            raise InvalidArgument(field, f"{part!r} is not WIDTHxHEIGHT (e.g. 256x256,512x512)")
        sizes.append((int(width), int(height)))
    if not sizes:
        raise InvalidArgument(field, "names no size")
    return tuple(sizes)


def check_warmup_size(width: int, height: int, multiple: int) -> None:
    """A warm-up size the stage could not serve fails at start, naming the flag."""
    try:
        contract.check_size(width, height, multiple)
    except InvalidArgument as error:
        raise InvalidArgument("--warmup-sizes", f"{width}x{height}: {error}") from None


def compile_module(module: torch.nn.Module) -> None:
    """Compile `module` in place (its identity, attributes and methods stay as they are)."""
    module.compile(dynamic=True)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile the model's repeated blocks in place (diffusers' regional compilation)."""
    model.compile_repeated_blocks(dynamic=True)


@contextlib.contextmanager
def eager(enabled: bool = True) -> Iterator[None]:
    """Run compiled modules eagerly inside the block (no compile, no guard checks)."""
    if not enabled:
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


class CompileWatch:
    """Counts the process's compiles and their seconds (torch's compile-event callbacks: one
    stage per process, so every compile in it is this stage's)."""

    def __init__(self, stage: str):
        from torch._dynamo.callback import on_compile_end, on_compile_start

        self.stage = stage
        self.compiles = 0
        self.recompiles = 0
        self.seconds = 0.0
        self.warmup_seconds = 0.0
        self.warmed_up = False
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        on_compile_start(self._start)
        on_compile_end(self._end)

    def _start(self, args) -> None:
        with self._lock:
            self._started[str(args.compile_id)] = time.perf_counter()

    def _end(self, args) -> None:
        with self._lock:
            started = self._started.pop(str(args.compile_id), None)
            seconds = time.perf_counter() - started if started is not None else 0.0
            self.compiles += 1
            self.seconds += seconds
            recompile = self.warmed_up
            self.recompiles += recompile
        COMPILES.labels(self.stage).inc()
        COMPILE_SECONDS.labels(self.stage).inc(seconds)
        if recompile:
            RECOMPILES.labels(self.stage).inc()
            log.warning("%s: compiled a new graph while serving (%.1f s)", self.stage, seconds)

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Compiles inside the block are warm-up's; after it, each one is a recompile."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.warmup_seconds += time.perf_counter() - started
            self.warmed_up = True
            log.info(
                "%s: warm-up took %.1f s, %d graphs compiled in %.1f s",
                self.stage,
                self.warmup_seconds,
                self.compiles,
                self.seconds,
            )

    def details(self) -> dict[str, int | float]:
        """For the stage's Info."""
        return {
            "compiles": self.compiles,
            "recompiles": self.recompiles,
            "compile_seconds": round(self.seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3),
        }
