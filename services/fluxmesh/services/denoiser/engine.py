"""The FLUX transformer and its flow-matching scheduler, run as FluxPipeline runs them.

Each request gets its own transformer-only `FluxPipeline` sharing the loaded transformer, with
a fresh scheduler built from the folder's config: diffusers schedulers are stateful, so one
shared across requests would corrupt both. Calling the pipeline itself (with precomputed
embeddings and `output_type="latent"`) keeps noise drawing, packing, the resolution-dependent
shift (mu), the guidance embedding and the loop exactly diffusers'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from fluxmesh.rpc.errors import Cancelled, InvalidArgument
from fluxmesh.services import model_folder
from fluxmesh.services.loras.stage import StageLoras
from fluxmesh.services.runtime import Placement, module_bytes

log = logging.getLogger(__name__)

MAX_SIDE = 2048
MAX_STEPS = 100
MAX_IMAGES = 8


@dataclass(frozen=True)
class DenoiseJob:
    prompt_embeds: torch.Tensor  # (P, L, D)
    pooled_prompt_embeds: torch.Tensor  # (P, D_pooled)
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    loras: tuple[tuple[str, float], ...] = ()


StepCallback = Callable[[int, int, float], None]  # (step 1-based, total, seconds)


class DenoiserEngine:
    def __init__(
        self,
        folder: Path,
        placement: Placement,
        *,
        transformer_gguf: Path | None = None,
        lora_dir: Path | None = None,
    ):
        self.folder = folder
        self.placement = placement
        self.transformer_gguf = transformer_gguf
        if transformer_gguf is not None:
            from fluxmesh.services.gguf import load_gguf_transformer

            # Weights stay quantized; placement.dtype is the compute dtype they dequantize to.
            transformer = load_gguf_transformer(transformer_gguf, folder, compute_dtype=placement.dtype,
                                                device=placement.device)
        else:
            transformer = FluxTransformer2DModel.from_pretrained(
                folder, subfolder="transformer", torch_dtype=placement.dtype, local_files_only=True
            )
        self.transformer = transformer.to(placement.device).eval()
        self.loras = StageLoras(lora_dir, self.transformer, "transformer")
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
        self.vae_scale_factor = model_folder.vae_scale_factor(folder)
        self.size_multiple = self.vae_scale_factor * 2
        config = self.transformer.config
        self.guidance_embeds = bool(config.guidance_embeds)
        self.joint_attention_dim = int(config.joint_attention_dim)
        self.pooled_projection_dim = int(config.pooled_projection_dim)
        log.info(
            "denoiser: transformer%s from %s on %s (%.1f MiB), guidance embedding: %s, LoRAs: %s",
            f" (GGUF {transformer_gguf})" if transformer_gguf else "", folder, placement.describe(),
            self.weight_bytes() / 2**20, self.guidance_embeds, lora_dir or "none",
        )

    def weight_bytes(self) -> int:
        return module_bytes(self.transformer)

    def check(self, job: DenoiseJob) -> None:
        """Reject a request before any compute, naming the field."""
        embeds, pooled = job.prompt_embeds, job.pooled_prompt_embeds
        if embeds.shape[-1] != self.joint_attention_dim:
            raise InvalidArgument("prompt_embeds.shape", f"last dimension {embeds.shape[-1]} != {self.joint_attention_dim}")
        if pooled.shape[-1] != self.pooled_projection_dim:
            raise InvalidArgument(
                "pooled_prompt_embeds.shape", f"last dimension {pooled.shape[-1]} != {self.pooled_projection_dim}"
            )
        if embeds.shape[0] != pooled.shape[0]:
            raise InvalidArgument("pooled_prompt_embeds.shape", f"batch {pooled.shape[0]} != prompt_embeds batch {embeds.shape[0]}")
        for field, value in (("width", job.width), ("height", job.height)):
            if value % self.size_multiple or not self.size_multiple <= value <= MAX_SIDE:
                raise InvalidArgument(field, f"{value} must be a multiple of {self.size_multiple} in [{self.size_multiple}, {MAX_SIDE}]")
        if not 1 <= job.steps <= MAX_STEPS:
            raise InvalidArgument("steps", f"{job.steps} is outside [1, {MAX_STEPS}]")
        if not 1 <= job.num_images <= MAX_IMAGES:
            raise InvalidArgument("num_images", f"{job.num_images} is outside [1, {MAX_IMAGES}]")
        if embeds.shape[0] * job.num_images > MAX_IMAGES:
            raise InvalidArgument("num_images", f"{embeds.shape[0]} prompts x {job.num_images} images exceeds {MAX_IMAGES}")
        if not torch.isfinite(torch.tensor(job.guidance)):
            raise InvalidArgument("guidance", f"{job.guidance} is not finite")
        self.loras.check(job.loras)

    def pipeline(self) -> FluxPipeline:
        """A per-request pipeline: shared transformer, fresh scheduler."""
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=self.transformer,
        )
        # Without a VAE the pipeline assumes 8; take it from the model at hand instead.
        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def denoise(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> torch.Tensor:
        """Run the loop; returns packed latents (P*num_images, seq, 4*C). Raises `Cancelled`
        between steps once `cancelled` is set."""
        device, dtype = self.placement.device, self.placement.dtype
        # diffusers repeats each prompt's embeddings num_images times (repeat + view); do the same
        # here so the batch matches the noise it draws for (P*num_images) latents.
        embeds = job.prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        pooled = job.pooled_prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        started = [time.perf_counter()]

        def step_end(pipe, i, t, kwargs):
            now = time.perf_counter()
            if on_step is not None:
                on_step(i + 1, job.steps, now - started[0])
            started[0] = now
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"cancelled after step {i + 1} of {job.steps}")
            return {}

        if cancelled is not None and cancelled.is_set():
            raise Cancelled("cancelled before the first step")
        # Adapters live in the shared transformer: switch them on the model thread, right before
        # this request's loop, so concurrent requests never see each other's set.
        self.loras.activate(list(job.loras))
        latents = self.pipeline()(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            width=job.width,
            height=job.height,
            num_inference_steps=job.steps,
            guidance_scale=job.guidance,
            num_images_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="latent",
            callback_on_step_end=step_end,
            callback_on_step_end_tensor_inputs=[],
        ).images
        return latents
