"""The vae stage's lane for live previews (x0 estimates sent while denoising goes on).

Previews run on their own model thread, so the final decode of any request never queues behind
a preview; a preview the caller gave up on (its call cancelled) is dropped if it has not started.
Output is a JPEG per image: previews are looked at once, not kept.

FLUXMESH_TEST_PREVIEW_DELAY (seconds) is for tests only: it makes every preview decode that
much slower, to prove that slow previews stall neither denoising nor the final result.
"""

from __future__ import annotations

import io
import logging
import os
import time

from fluxmesh.services.runtime.worker import ModelWorker
from fluxmesh.v1 import common_pb2

log = logging.getLogger(__name__)

TEST_DELAY_ENV = "FLUXMESH_TEST_PREVIEW_DELAY"
JPEG_QUALITY = 85


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

    async def decode(self, latents, width: int, height: int) -> list[common_pb2.Image]:
        return await self.worker.run(self._decode, latents, width, height)

    def _decode(self, latents, width: int, height: int) -> list[common_pb2.Image]:
        if self.test_delay:
            time.sleep(self.test_delay)
        out = []
        for image in self.engine.decode(latents, width, height):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            out.append(common_pb2.Image(width=image.width, height=image.height, format=common_pb2.IMAGE_FORMAT_JPEG,
                                        data=buffer.getvalue()))
        return out
