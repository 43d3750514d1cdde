"""The vae stage's lane for live previews (x0 estimates sent while denoising goes on).

Previews run on their own model thread, so the final decode of any request never queues behind
a preview; a preview the caller gave up on (its call cancelled) is dropped if it has not started.
Output is a `Jpeg` per image (previews are looked at once, not kept); the servicer makes protobuf of it.

FLUXMESH_TEST_PREVIEW_DELAY (seconds) is for tests only: it makes every preview decode that
much slower, to prove that slow previews stall neither denoising nor the final result.
"""

from __future__ import annotations

import logging
import os
import time

from fluxmesh.services.previews.jpeg import Jpeg, encode_jpeg
from fluxmesh.services.runtime.worker import ModelWorker

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "FLUXMESH_TEST_PREVIEW_DELAY"


class PreviewLane:
    def __init__(self, engine, stage_worker: ModelWorker):
        self.engine = engine
        self.worker = ModelWorker("vae-preview", own_thread=True)
        # The stage's residency guard (set on its main worker) holds for previews too: a preview
        # never loads weights, nor runs while they are released.
        self.worker.precondition = lambda: stage_worker.precondition and stage_worker.precondition()
        self.test_delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        if self.test_delay:
            log.warning("vae: previews slowed down by %.2fs (%s, for tests only)", self.test_delay, TEST_DELAY_ENV)

    async def decode(self, latents, width: int, height: int) -> list[Jpeg]:
        return await self.worker.run(self._decode, latents, width, height)

    def _decode(self, latents, width: int, height: int) -> list[Jpeg]:
        if self.test_delay:
            time.sleep(self.test_delay)
        return [encode_jpeg(image) for image in self.engine.decode(latents, width, height)]
