"""Sequential mode: the three stages take turns on one accelerator.

Only one stage holds its weights on the device at a time. Before a stage's turn the orchestrator
releases the stage that had it (Residency.Release; waiting for it to finish) and then loads the
next (Residency.Load) — one *swap*. Stage calls go through `use(stage)`, which waits until
that stage is the loaded one.

Grouping by phase, in rounds: a loaded stage serves every request that existed when it was
loaded (and later ones while nobody waits for another stage); when its round is done and it is
idle, the stage the oldest waiting request needs is loaded next. A burst of N requests admitted
together is thus encoded while the encoder is loaded, denoised while the denoiser is, decoded
while the VAE is: three swaps, not 3N. Rounds keep it starvation-free: a stream of new prompts
cannot hold the encoder while older requests wait to be denoised; they form the next round.

Each request's SwapCost counts the swaps it waited on (the ones that loaded a stage it was
waiting for) and their time: requests of one group share swaps, so do not add them up.

Released weights go to CPU memory (fast to load again) or are dropped (read from the model
files again): `release_to`, a fluxmesh.contract.ReleaseTo, sent as it is. Each stage applies
"auto" itself (CPU memory on an accelerator, dropped on the CPU), as it knows its device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fluxmesh.contract import ReleaseTo
from fluxmesh.orchestrator.replicas import Replica, is_dns_target
from fluxmesh.orchestrator.residency.resident import SwapCost, next_order
from fluxmesh.orchestrator.stages import StageClient, stage_errors
from fluxmesh.rpc.errors import NOT_RESIDENT, FluxmeshError, InvalidArgument
from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.02  # before choosing what to load; a swap itself takes seconds
SWAP_TIMEOUT = 900.0  # reading FLUX.1-dev's 24 GB transformer from a slow disk takes minutes

# Requests admitted at once in sequential mode (default of --max-active): grouping only spans
# admitted requests, so this is the largest group that shares one round of three swaps. With
# FLUX.1-dev on a 16 GB card a swap costs seconds (12-24 GB over PCIe, or from disk) and one
# 28-step 1024x1024 denoise tens of seconds; 8 spreads the swaps to under half a swap per request
# while the first request of a full group waits for 8 encodes and 8 denoises before its decode.
# Each admitted request holds only its embeddings in the orchestrator (<= 8 MiB at T5 length 512).
SEQUENTIAL_MAX_ACTIVE = 8


@dataclass(eq=False)
class _Waiter:
    stage: str
    cost: SwapCost
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def order(self) -> int:
        return self.cost.order


class SequentialStrategy:
    stages_stay_loaded = False  # one stage's weights on the accelerator at a time

    def __init__(
        self,
        stages: Iterable[StageClient],
        release_to: ReleaseTo | str = ReleaseTo.auto,
        *,
        swap_timeout: float = SWAP_TIMEOUT,
    ):
        self.clients = {client.stage: client for client in stages}
        self.release_to = ReleaseTo(release_to)
        self.swap_timeout = swap_timeout
        for client in self.clients.values():
            dns = [r.target for r in client.replicas.replicas if is_dns_target(r.target)]
            if dns:
                raise InvalidArgument(
                    client.stage,
                    f"{dns[0]}: sequential mode loads and releases each replica's "
                    "weights, so it needs their addresses, not a dns:/// name",
                )
        self.loaded: str | None = None  # the stage whose weights are on the device (None: none or unknown)
        self._round = 0  # requests ordered before this were there when the loaded stage was loaded
        self._users = 0  # calls in progress on the loaded stage
        self._waiters: list[_Waiter] = []
        self._swapping = False
        self._stubs: dict[int, residency_pb2_grpc.ResidencyStub] = {}
        self._tasks: set[asyncio.Task] = set()
        self.swaps = 0
        self.swap_seconds = 0.0

    # -- the residency hook ------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, stage: str, cost: SwapCost | None = None) -> AsyncIterator[None]:
        """Wait until `stage` is the loaded stage and this request's turn; hold it meanwhile."""
        waiter = _Waiter(stage, cost if cost is not None else SwapCost())
        if self._may_enter(waiter):
            self._users += 1
        else:
            self._waiters.append(waiter)
            self._schedule()
            try:
                await waiter.granted
            except BaseException:
                if waiter in self._waiters:  # given up while waiting (cancelled, deadline)
                    self._waiters.remove(waiter)
                elif waiter.granted.done() and not waiter.granted.cancelled() and waiter.granted.exception() is None:
                    self._users -= 1  # granted, but the caller left before using it
                self._schedule()
                raise
        try:
            yield
        except FluxmeshError as error:
            if error.reason == NOT_RESIDENT:
                # The stage says it is not loaded (restarted?): forget what we believed.
                log.warning("%s stage is not loaded after all; loading it again for the next request", stage)
                self.loaded = None
            raise
        finally:
            self._users -= 1
            self._schedule()

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # -- scheduling (event loop only, no awaits: nothing interleaves) ------------------------

    def _may_enter(self, waiter: _Waiter) -> bool:
        """The loaded stage serves its round: every request that existed when it was loaded.
        Later ones join while nobody waits for another stage, else they wait for the next round."""
        if self._swapping or self.loaded != waiter.stage:
            return False
        return waiter.order < self._round or not any(w.stage != waiter.stage for w in self._waiters)

    def _schedule(self) -> None:
        if self._swapping:
            return
        self._schedule_grants()
        if self._users == 0 and self._waiters:
            self._swapping = True
            task = asyncio.get_running_loop().create_task(self._swap())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _schedule_grants(self) -> None:
        if self.loaded is not None:
            for waiter in [w for w in self._waiters if self._may_enter(w)]:
                self._waiters.remove(waiter)
                self._users += 1
                waiter.granted.set_result(None)

    async def _swap(self) -> None:
        # A request that just finished a phase is on its way to wait for the next one (it sends
        # its client two events first); let it arrive so it counts when choosing what to load.
        await asyncio.sleep(SETTLE_SECONDS)
        self._swapping = False
        self._schedule_grants()
        if self._users or not self._waiters:
            self._schedule()
            return
        self._swapping = True
        target = min(self._waiters, key=lambda w: w.order).stage
        started = time.perf_counter()
        try:
            # Release first and wait for it: the next stage loads only once the device is free.
            # Every other stage is told, not only the one we loaded last: releasing a released
            # stage costs one round trip, and a stage someone else loaded (or that restarted
            # resident) cannot sit on the device unnoticed.
            others = [s for s in self.clients if s != target]
            released = await asyncio.gather(*(self._release(stage) for stage in others))
            self.loaded = None
            loaded = await self._load(target)
            moved = loaded or any(released)
        except Exception as error:  # noqa: BLE001 - handed to the requests that waited for it
            self.loaded = None
            failure = error if isinstance(error, FluxmeshError) else FluxmeshError(f"{target} swap failed: {error}")
            for waiter in [w for w in self._waiters if w.stage == target]:
                self._waiters.remove(waiter)
                waiter.granted.set_exception(failure)
            log.error("loading the %s stage failed: %s", target, error)
        else:
            seconds = time.perf_counter() - started
            self.loaded = target
            self._round = next_order()
            if not moved:  # it was loaded and nothing else was: no swap happened
                return
            self.swaps += 1
            self.swap_seconds += seconds
            for waiter in self._waiters:
                if waiter.stage == target:
                    waiter.cost.swaps += 1
                    waiter.cost.seconds += seconds
            log.info(
                "swap %d: %s loaded in %.2fs (%d requests waiting for it)",
                self.swaps,
                target,
                seconds,
                sum(w.stage == target for w in self._waiters),
            )
        finally:
            self._swapping = False
            self._schedule()

    # -- Residency calls -----------------------------------------------------------------------

    async def _release(self, stage: str) -> bool:
        """Release `stage` on every replica; True when weights actually moved."""
        # auto is the stage's to apply: it knows its device (fluxmesh.contract.ReleaseTo.on).
        request = residency_pb2.ReleaseRequest(release_to=self.release_to.pb)
        return await self._each_replica(stage, "Release", request)

    async def _load(self, stage: str) -> bool:
        """Load `stage` on every replica; True when weights actually moved."""
        return await self._each_replica(stage, "Load", residency_pb2.LoadRequest())

    async def _each_replica(self, stage: str, method: str, request) -> bool:
        async def call(replica: Replica) -> bool:
            stub = self._stubs.get(id(replica))
            if stub is None:
                stub = self._stubs[id(replica)] = residency_pb2_grpc.ResidencyStub(replica.channel)
            with stage_errors(stage, replica.target):
                status = await getattr(stub, method)(request, timeout=self.swap_timeout)
            return status.seconds > 0

        return any(await asyncio.gather(*(call(replica) for replica in self.clients[stage].replicas.replicas)))
