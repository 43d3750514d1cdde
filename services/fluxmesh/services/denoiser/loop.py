"""The denoising loop, owned by the denoiser so that requests can share a transformer forward.

A `Lane` is one request inside the loop. It is prepared the way the diffusers pipeline's
`__call__` prepares it, with diffusers' own pieces called in the same order on a per-request
pipeline (`retrieve_timesteps`, `calculate_shift`, the pipeline's `prepare_latents` — which
draws the noise and packs it with `_pack_latents`, `_prepare_latent_image_ids` —,
`get_timesteps` for image-to-image, `prepare_mask_latents` for inpainting), so its scheduler,
sigmas, noise, guidance and init image are exactly the pipeline's. Each step, `forward` runs
the transformer once for every lane handed to it (their rows concatenated: per-sample timestep,
guidance, pooled projection and text embeddings), then each lane takes its own scheduler step
(and, inpainting, blends the original back in as FluxInpaintPipeline does), reports the step,
makes its previews and checks its cancellation.

What the four pipelines' loops do, and where it is here:
    timestep = t.expand(B) / 1000, guidance = full(B, g)     -> Lane.rows
    transformer(...) [true CFG: a second one, negative]      -> forward (one call; CFG rows ride along)
    noise_pred = neg + scale * (noise_pred - neg)            -> Lane.advance
    latents = scheduler.step(noise_pred, t, latents)         -> Lane.advance
    inpainting: latents = (1 - mask) * scale_noise(...) + mask * latents
    Fill: hidden_states = cat(latents, masked_image_latents) -> Lane.rows
A lane alone makes the very calls the pipeline makes (true CFG: the two passes in one batch of
2B, which changes nothing but summation order).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from fluxmesh.rpc.errors import Cancelled
from fluxmesh.services.denoiser.modes import (
    Fill,
    Geometry,
    ImageToImage,
    Inpaint,
    Mode,
    choose_mode,
)
from fluxmesh.services.denoiser.previews import Previewer

if TYPE_CHECKING:
    from fluxmesh.services.denoiser.engine import (
        DenoiseJob,
        DenoiserEngine,
        StepCallback,
    )

__all__ = ["Lane", "forward", "run_alone"]


class Lane:
    """One request's state in the loop: prepared on the model thread, stepped by `forward`."""

    def __init__(
        self,
        engine: DenoiserEngine,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        cancelled: threading.Event | None = None,
    ):
        device, dtype = engine.device.torch_device, engine.device.dtype
        self.job, self.on_step, self.cancelled = job, on_step, cancelled
        if job.conditioning is not None:
            raise ValueError("Kontext and Control run in their pipeline's own loop, not in a lane")
        self.mode: Mode = choose_mode(job.init, fill_transformer=engine.fill)
        # diffusers repeats each prompt's embeddings num_images times (repeat + view); so do we,
        # so the batch matches the noise drawn for (P*num_images) latents.
        self.embeds = job.prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        self.pooled = job.pooled_prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        self.negative: tuple[torch.Tensor, torch.Tensor] | None = None
        if job.true_cfg:
            self.negative = (
                job.negative_prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0),
                job.negative_pooled_prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0),
            )
        self.previewer = (
            Previewer(job.preview, job.width, job.height, engine.vae_scale_factor, engine.latent_channels)
            if job.preview is not None
            else None
        )
        self.pipe = engine.pipeline(self.mode.pipeline_class, x0=self.previewer is not None)
        self.batch = self.embeds.shape[0]
        self.mask = self.noise = self.image_latents = self.fill_latents = None
        geometry = Geometry(batch=self.batch, width=job.width, height=job.height, device=device, dtype=dtype)
        self._prepare(self.mode.inputs(self.pipe, job.seed, geometry), engine, device, dtype)
        # What FluxPipeline.encode_prompt returns alongside precomputed embeddings.
        self.text_ids = torch.zeros(self.embeds.shape[1], 3).to(device=device, dtype=engine.transformer.dtype)
        self.guidance = (
            torch.full([1], job.guidance, device=device, dtype=torch.float32).expand(self.batch)
            if engine.guidance_embeds
            else None
        )
        self.index = 0
        self.error: BaseException | None = None  # set when this lane failed on its own (previews, ...)
        self._last = time.perf_counter()

    def _prepare(
        self, inputs: dict[str, Any], engine: DenoiserEngine, device: torch.device, dtype: torch.dtype
    ) -> None:
        """`__call__` of the mode's pipeline up to its loop, in its order."""
        pipe, job, scheduler = self.pipe, self.job, self.pipe.scheduler
        generator = inputs["generator"]
        steps = job.steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        shift = {
            "base_seq_len": scheduler.config.get("base_image_seq_len", 256),
            "max_seq_len": scheduler.config.get("max_image_seq_len", 4096),
            "base_shift": scheduler.config.get("base_shift", 0.5),
            "max_shift": scheduler.config.get("max_shift", 1.15),
        }
        in_channels = engine.transformer.config.in_channels
        if not isinstance(self.mode, ImageToImage | Inpaint | Fill):  # FluxPipeline
            self.latents, self.image_ids = pipe.prepare_latents(
                self.batch, in_channels // 4, job.height, job.width, dtype, device, generator, None
            )
            if getattr(scheduler.config, "use_flow_sigmas", False):
                sigmas = None
            mu = calculate_shift(self.latents.shape[1], **shift)
            self.timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
            return
        vsf = pipe.vae_scale_factor
        extra = {"crops_coords": None, "resize_mode": "default"} if isinstance(self.mode, Inpaint) else {}
        init_image = pipe.image_processor.preprocess(inputs["image"], height=job.height, width=job.width, **extra)
        init_image = init_image.to(dtype=torch.float32)
        mu = calculate_shift((job.height // vsf // 2) * (job.width // vsf // 2), **shift)
        _timesteps, count = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        self.timesteps, count = pipe.get_timesteps(count, inputs["strength"], device)
        latent_timestep = self.timesteps[:1].repeat(self.batch)
        channels = pipe.vae.config.latent_channels if isinstance(self.mode, Fill) else in_channels // 4
        prepared = pipe.prepare_latents(
            init_image, latent_timestep, self.batch, channels, job.height, job.width, dtype, device, generator, None
        )
        if isinstance(self.mode, Inpaint):
            self.latents, self.noise, self.image_latents, self.image_ids = prepared
            mask_condition = pipe.mask_processor.preprocess(
                inputs["mask_image"], height=job.height, width=job.width, resize_mode="default", crops_coords=None
            )
            self.mask, _ = pipe.prepare_mask_latents(
                mask_condition,
                inputs["masked_image_latents"],
                self.batch,
                channels,
                1,
                job.height,
                job.width,
                dtype,
                device,
                generator,
            )
        else:
            self.latents, self.image_ids = prepared
            if isinstance(self.mode, Fill):
                self.fill_latents = inputs["masked_image_latents"].to(self.latents.device)

    # -- what the batch needs to know -------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        """Rows this lane puts into a forward: its images, twice with true CFG."""
        return self.batch * (2 if self.negative is not None else 1)

    def cancellation(self) -> Cancelled | None:
        """The error to leave with once the caller has gone (checked at every step boundary)."""
        if self.cancelled is None or not self.cancelled.is_set():
            return None
        return Cancelled(
            "cancelled before the first step"
            if self.index == 0
            else f"cancelled after step {self.index} of {self.job.steps}"
        )

    def inputs(self) -> dict[str, torch.Tensor | None]:
        """This step's transformer inputs, one row per image (true CFG: the negative rows after)."""
        t = self.timesteps[self.index]
        hidden = self.latents if self.fill_latents is None else torch.cat((self.latents, self.fill_latents), dim=2)
        timestep = t.expand(self.latents.shape[0]).to(self.latents.dtype) / 1000
        rows = {
            "hidden_states": hidden,
            "timestep": timestep,
            "guidance": self.guidance,
            "pooled_projections": self.pooled,
            "encoder_hidden_states": self.embeds,
        }
        if self.negative is not None:
            negative_embeds, negative_pooled = self.negative
            rows = {
                **{k: _twice(v) for k, v in rows.items()},
                "pooled_projections": torch.cat((self.pooled, negative_pooled)),
                "encoder_hidden_states": torch.cat((self.embeds, negative_embeds)),
            }
        return rows

    def advance(self, noise_pred: torch.Tensor) -> None:
        """The rest of the pipeline's step: CFG, scheduler step, inpainting blend, callback."""
        i, t = self.index, self.timesteps[self.index]
        if self.negative is not None:
            positive, negative = noise_pred.chunk(2)
            noise_pred = negative + self.job.true_cfg_scale * (positive - negative)
        latents = self.pipe.scheduler.step(noise_pred, t, self.latents, return_dict=False)[0]
        if self.mask is not None:  # FluxInpaintPipeline: the kept region follows the original
            original = self.image_latents
            if i < len(self.timesteps) - 1:
                original = self.pipe.scheduler.scale_noise(original, torch.tensor([self.timesteps[i + 1]]), self.noise)
            latents = (1 - self.mask) * original + self.mask * latents
        self.latents = latents
        self.index += 1
        now = time.perf_counter()
        if self.on_step is not None:
            preview = self.previewer.at(self.index, self.pipe.scheduler) if self.previewer is not None else None
            self.on_step(self.index, len(self.timesteps), now - self._last, preview)
        self._last = now


def forward(transformer: torch.nn.Module, lanes: Sequence[Lane]) -> None:
    """One transformer forward for all `lanes` (same size, text length and mode), then each
    lane's own step. Raises what the forward raises (every lane of it failed); what fails in
    one lane's own step (its previews, its callback) is that lane's `error`."""
    parts = [lane.inputs() for lane in lanes]
    if len(parts) == 1:
        batch = parts[0]
    else:
        batch = {key: None if parts[0][key] is None else torch.cat([p[key] for p in parts]) for key in parts[0]}
    with transformer.cache_context("cond"):  # FluxPipeline's name for the (first) pass
        noise_pred = transformer(
            **batch, txt_ids=lanes[0].text_ids, img_ids=lanes[0].image_ids, joint_attention_kwargs={}, return_dict=False
        )[0]
    for lane, out in zip(lanes, noise_pred.split([lane.rows for lane in lanes])):
        try:
            lane.advance(out)
        except Exception as error:  # noqa: BLE001 - this lane's alone; the others carry on
            lane.error = error


def run_alone(transformer: torch.nn.Module, lane: Lane) -> torch.Tensor:
    """A lane's whole loop by itself (no batching): its packed latents, or its error."""
    while True:
        if (error := lane.error or lane.cancellation()) is not None:
            raise error
        if lane.done:
            return lane.latents
        forward(transformer, [lane])


def _twice(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else torch.cat((tensor, tensor))
