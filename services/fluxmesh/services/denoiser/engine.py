"""The FLUX transformer and its flow-matching scheduler, run as FluxPipeline runs them.

Each request gets its own transformer-only `FluxPipeline` sharing the loaded transformer, with
a fresh scheduler built from the folder's config: diffusers schedulers are stateful, so one
shared across requests would corrupt both. Calling the pipeline itself (with precomputed
embeddings and `output_type="latent"`) keeps noise drawing, packing, the resolution-dependent
shift (mu), the guidance embedding and the loop exactly diffusers'.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from fluxmesh import contract
from fluxmesh.contract import Stage
from fluxmesh.rpc.errors import Cancelled, InvalidArgument
from fluxmesh.services.denoiser.control_lora import ControlLora
from fluxmesh.services.denoiser.controlnet import ControlNets
from fluxmesh.services.denoiser.family import (
    Conditioning,
    check_conditioning,
    choose_family_mode,
    is_control_transformer,
)
from fluxmesh.services.denoiser.family_edits import choose_family_edit
from fluxmesh.services.denoiser.ip_adapter import (
    IpAdapterInput,
    IpAdapterWeights,
    check_ip_adapter_input,
    pipeline_inputs,
)
from fluxmesh.services.denoiser.loop import Lane, run_alone
from fluxmesh.services.denoiser.modes import (
    Geometry,
    InitImage,
    VaeConfig,
    check_init,
    choose_mode,
    is_fill_transformer,
)
from fluxmesh.services.denoiser.previews import Previewer, PreviewSpec, StepPreview, X0Scheduler
from fluxmesh.services.denoiser.step_cache import AttentionCounter, StepCacheLimits, StepCachePolicy
from fluxmesh.services.loras.stage import StageLoras
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.compile import CompileOptions, CompileWatch, check_warmup_size, compile_blocks, eager
from fluxmesh.services.runtime.device import Device
from fluxmesh.services.runtime.memory import module_bytes

log = logging.getLogger(__name__)


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
    init: InitImage | None = None  # image-to-image / inpainting / Fill
    preview: PreviewSpec | None = None
    # True CFG (FluxPipeline's true_cfg_scale): the negative prompt's embeddings, same shapes.
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    true_cfg_scale: float = 1.0
    conditioning: Conditioning | None = None  # Kontext reference / Control image (family.py)
    cache: StepCachePolicy | None = None  # step caching asked for (None: the server's default)
    ip_adapter: IpAdapterInput | None = None  # an IP-Adapter image prompt (ip_adapter.py)

    @property
    def true_cfg(self) -> bool:
        return self.negative_prompt_embeds is not None

    @property
    def in_pipeline(self) -> bool:
        """Run by its diffusers pipeline's own loop, alone (Kontext, Control, IP-Adapter)."""
        return self.conditioning is not None or self.ip_adapter is not None


# (step 1-based, total, seconds, the step's preview when one is due)
StepCallback = Callable[[int, int, float, StepPreview | None], None]


class DenoiserEngine:
    def __init__(
        self,
        folder: Path,
        device: Device,
        *,
        transformer_gguf: Path | None = None,
        lora_dir: Path | None = None,
        step_cache: StepCacheLimits = StepCacheLimits(),
        control_lora: Path | None = None,
        controlnets: Sequence[Path] = (),
        ip_adapter: Path | None = None,
        compile: CompileOptions = CompileOptions(),
        load: bool = True,
    ):
        """`load=False` leaves the weights unread: the stage's `Residency` loads them when told.
        `control_lora`: a FLUX.1 Canny/Depth LoRA, fused into a base model each time it is read.
        `controlnets`: FluxControlNetModel folders, held (and released) with the transformer.
        `ip_adapter`: an XLabs ip_adapter.safetensors, read into each transformer loaded.
        `compile`: torch.compile each transformer loaded, warmed up by `warm_up` (compile.py)."""
        self.folder = folder
        self.device = device
        self.transformer_gguf = transformer_gguf
        self.transformer: FluxTransformer2DModel | None = None
        self.compile = compile
        self.compile_watch = CompileWatch(Stage.denoiser) if compile.enabled else None
        # bound to each transformer loaded; a compiled one takes its LoRAs in a hot-swap slot
        self.loras = StageLoras(
            lora_dir, None, "transformer", hotswap_rank=compile.max_lora_rank if compile.enabled else None
        )
        self.step_cache = step_cache  # the default policy and the ceiling (step_cache.py)
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler")
        self.vae_scale_factor = model_folder.vae_scale_factor(folder)
        self.size_multiple = self.vae_scale_factor * 2
        # Facts from the config, not the module: they hold while the weights are released.
        config = model_folder.read_config(folder, "transformer")
        self.guidance_embeds = bool(config.get("guidance_embeds", False))
        self.joint_attention_dim = int(config["joint_attention_dim"])
        self.pooled_projection_dim = int(config["pooled_projection_dim"])
        # The edit pipelines read the VAE's config (never its weights, which the vae stage holds).
        self.vae_config = model_folder.read_config(folder, "vae")
        self.latent_channels = int(self.vae_config.get("latent_channels", 16))
        in_channels = int(config.get("in_channels", 64))
        out_channels = int(config.get("out_channels") or in_channels)
        self.fill = is_fill_transformer(in_channels, out_channels, self.vae_scale_factor)
        self.control_lora = None
        if control_lora is not None:
            if transformer_gguf is not None:
                raise InvalidArgument("control_lora", "widening a GGUF transformer's x_embedder is not served")
            self.control_lora = ControlLora(control_lora, in_channels=in_channels, out_channels=out_channels)
        # FLUX.1-Canny/Depth, or a base model with their Control LoRA
        self.control = is_control_transformer(in_channels, out_channels) or self.control_lora is not None
        # FLUX.1-Kontext has FLUX.1-dev's shapes: only its model_index.json says what it is.
        self.kontext = model_folder.read_index(folder).get("_class_name", "").startswith("FluxKontext")
        self.controlnets = ControlNets(controlnets, config)
        self.ip_adapter = (
            IpAdapterWeights(
                ip_adapter,
                joint_attention_dim=self.joint_attention_dim,
                inner_dim=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                double_blocks=int(config["num_layers"]),
            )
            if ip_adapter is not None
            else None
        )
        for width, height in compile.warmup_sizes if compile.enabled else ():
            check_warmup_size(width, height, self.size_multiple)
        log.info(
            "denoiser: transformer%s from %s for %s, guidance embedding: %s, LoRAs: %s",
            f" (GGUF {transformer_gguf})" if transformer_gguf else "",
            folder,
            device.describe(),
            self.guidance_embeds,
            lora_dir or "none",
        )
        if load:
            self.load_weights(device.torch_device)

    def load_weights(self, device: torch.device) -> None:
        """Read the transformer from the model files onto `device` (CPU for an offloaded start)."""
        if self.transformer_gguf is not None:
            from fluxmesh.services.gguf import load_gguf_transformer

            # Weights stay quantized; device.dtype is the compute dtype they dequantize to.
            transformer = load_gguf_transformer(
                self.transformer_gguf, self.folder, compute_dtype=self.device.dtype, device=device
            )
        else:
            transformer = FluxTransformer2DModel.from_pretrained(
                self.folder,
                subfolder="transformer",
                torch_dtype=self.device.dtype,
                local_files_only=True,
                use_safetensors=True,  # never unpickle a .bin
            )
        if self.control_lora is not None:
            self.control_lora.apply(transformer)
        self.transformer = transformer.to(device).eval()
        if self.ip_adapter is not None:
            self.ip_adapter.load(self.pipeline())
        self.loras.bind(self.transformer)  # before compiling: the hot-swap slot is part of the graph
        self.controlnets.load(device, self.device.dtype)
        if self.compile.enabled:
            compile_blocks(self.transformer)

    def warm_up(self, max_batch: int) -> None:
        """Compile now, for each --warmup-sizes size at 1, 2 and `max_batch` rows, so that no
        request waits for it (compile.py: later shapes reuse these graphs). On the model
        thread, before the stage reports SERVING. A stage started without its weights compiles
        at its first request after Load instead."""
        if self.compile_watch is None:
            return
        with self.compile_watch.warming_up():
            if self.transformer is None:
                return
            self.loras.activate([])  # the slot as every request without a LoRA finds it
            device, dtype = self.device.torch_device, self.device.dtype
            text = 512 if self.guidance_embeds else 256  # the encoder's default T5 length
            zeros = functools.partial(torch.zeros, device=device, dtype=dtype)
            for width, height in self.compile.warmup_sizes:
                seq = (width // self.size_multiple) * (height // self.size_multiple)
                for rows in sorted({1, min(2, max_batch), max_batch}):
                    self.transformer(
                        hidden_states=zeros(rows, seq, self.transformer.config.in_channels),
                        timestep=torch.ones(rows, device=device, dtype=dtype),
                        guidance=torch.full((rows,), 3.5, device=device) if self.guidance_embeds else None,
                        pooled_projections=zeros(rows, self.pooled_projection_dim),
                        encoder_hidden_states=zeros(rows, text, self.joint_attention_dim),
                        txt_ids=zeros(text, 3),
                        img_ids=zeros(seq, 3),
                        joint_attention_kwargs={},
                        return_dict=False,
                    )

    def drop_weights(self) -> None:
        self.loras.bind(None)
        self.transformer = None
        self.controlnets.drop()
        if self.ip_adapter is not None:
            self.ip_adapter.drop()

    def weight_modules(self) -> list[torch.nn.Module]:
        ip_adapter = self.ip_adapter.modules() if self.ip_adapter is not None else []
        return ([self.transformer] if self.transformer is not None else []) + self.controlnets.modules() + ip_adapter

    def weight_bytes(self) -> int:
        return module_bytes(*self.weight_modules())

    def check(self, job: DenoiseJob) -> None:
        """Reject a request before any compute, naming the field."""
        embeds, pooled = job.prompt_embeds, job.pooled_prompt_embeds
        for field, tensor in (("prompt_embeds", embeds), ("pooled_prompt_embeds", pooled)):
            contract.check_float_dtype(f"{field}.dtype", str(tensor.dtype))
        # image prompts (Redux) append their tokens to T5's
        contract.check_conditioning_length("prompt_embeds.shape", embeds.shape[1])
        if embeds.shape[-1] != self.joint_attention_dim:
            raise InvalidArgument(
                "prompt_embeds.shape", f"last dimension {embeds.shape[-1]} != {self.joint_attention_dim}"
            )
        if pooled.shape[-1] != self.pooled_projection_dim:
            raise InvalidArgument(
                "pooled_prompt_embeds.shape", f"last dimension {pooled.shape[-1]} != {self.pooled_projection_dim}"
            )
        if embeds.shape[0] != pooled.shape[0]:
            raise InvalidArgument(
                "pooled_prompt_embeds.shape", f"batch {pooled.shape[0]} != prompt_embeds batch {embeds.shape[0]}"
            )
        contract.check_size(job.width, job.height, self.size_multiple)
        contract.check_steps(job.steps)
        contract.check_num_images(job.num_images, prompts=embeds.shape[0])
        contract.check_guidance(job.guidance)
        self.loras.check(job.loras)
        self.step_cache.resolve(job.cache)
        self._check_true_cfg(job)
        if job.init is not None:
            check_init(
                job.init,
                width=job.width,
                height=job.height,
                steps=job.steps,
                latent_channels=self.latent_channels,
                vae_scale_factor=self.vae_scale_factor,
            )
        check_conditioning(
            job.conditioning,
            job.init,
            kontext_model=self.kontext,
            control_model=self.control,
            width=job.width,
            height=job.height,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
        )
        if job.conditioning is not None and job.conditioning.controlnets:
            self._check_controlnets(job)
        if job.conditioning is not None and job.conditioning.control_posterior is not None and job.true_cfg:
            raise InvalidArgument("true_cfg_scale", "FluxControlPipeline has no true CFG")
        check_ip_adapter_input(
            job.ip_adapter, self.ip_adapter, pipeline_class=self._mode(job).pipeline_class, true_cfg=job.true_cfg
        )
        if job.ip_adapter is not None and job.conditioning is not None and job.conditioning.controlnets:
            raise InvalidArgument("ip_adapter", "an IP-Adapter image prompt with ControlNets is not served")
        steps_run = contract.steps_after_strength(job.steps, job.init.strength) if job.init is not None else job.steps
        kontext = job.conditioning.kontext_latents if job.conditioning is not None else None
        # the reference's tokens join the image's in every forward
        reference_pixels = kontext.shape[2] * kontext.shape[3] * self.vae_scale_factor**2 if kontext is not None else 0
        images = embeds.shape[0] * job.num_images
        contract.check_work(job.width, job.height, images, steps_run, job.true_cfg, reference_pixels=reference_pixels)
        self._mode(job)  # a Fill model runs only Fill requests
        if job.preview is not None:
            job.preview.check(self.latent_channels)

    def _check_true_cfg(self, job: DenoiseJob) -> None:
        negative, pooled = job.negative_prompt_embeds, job.negative_pooled_prompt_embeds
        if (negative is None) != (pooled is None):
            missing = "negative_prompt_embeds" if negative is None else "negative_pooled_prompt_embeds"
            raise InvalidArgument(missing, "true CFG needs both negative embeddings")
        contract.check_true_cfg_scale(job.true_cfg_scale)
        if job.true_cfg != (job.true_cfg_scale > 1.0):  # diffusers would ignore the one without the other
            raise InvalidArgument("true_cfg_scale", "negative embeddings and true_cfg_scale > 1 go together")
        if not job.true_cfg:
            return
        for field, tensor, like in (
            ("negative_prompt_embeds", negative, job.prompt_embeds),
            ("negative_pooled_prompt_embeds", pooled, job.pooled_prompt_embeds),
        ):
            if tensor.shape != like.shape:
                raise InvalidArgument(f"{field}.shape", f"{list(tensor.shape)} != {list(like.shape)} of the prompt's")
            contract.check_float_dtype(f"{field}.dtype", str(tensor.dtype))
        if self.fill:
            raise InvalidArgument("true_cfg_scale", "FLUX.1-Fill models have no true CFG (FluxFillPipeline)")

    def _check_controlnets(self, job: DenoiseJob) -> None:
        conditioning = job.conditioning
        if conditioning.kontext_latents is not None or conditioning.control_posterior is not None:
            raise InvalidArgument(
                "conditioning.controlnets", "FluxControlNetPipeline takes no Kontext or Control input"
            )
        self.controlnets.check(
            conditioning.controlnets,
            init=job.init is not None,
            batch=job.prompt_embeds.shape[0] * job.num_images,
            width=job.width,
            height=job.height,
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
        )

    def _mode(self, job: DenoiseJob):
        if job.conditioning is not None and job.conditioning.controlnets:
            return self.controlnets.mode(job.conditioning.controlnets, job.init, self.vae_config, self.device.dtype)
        return (
            choose_family_edit(job.conditioning, job.init)
            or choose_family_mode(job.conditioning)
            or choose_mode(job.init, fill_transformer=self.fill)
        )

    def pipeline(self, pipeline_class: type = FluxPipeline, *, x0: bool = False, **components) -> FluxPipeline:
        """A per-request pipeline: shared transformer, fresh scheduler (one that keeps the x0
        estimate when previews need it); `components` the mode's own (a ControlNet, its vae)."""
        scheduler_class = X0Scheduler if x0 else FlowMatchEulerDiscreteScheduler
        pipe = pipeline_class(
            **{
                "scheduler": scheduler_class.from_config(self.scheduler_config),
                "vae": VaeConfig(self.vae_config, self.device.dtype),
                "text_encoder": None,
                "tokenizer": None,
                "text_encoder_2": None,
                "tokenizer_2": None,
                "transformer": self.transformer,
                **components,
            }
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def batchable(self, job: DenoiseJob) -> bool:
        """Whether the request runs in the denoiser's own loop (loop.py), where compatible requests
        share forwards: text to image, image to image, inpainting and Fill. Kontext and Control
        run their pipeline's own loop, alone."""
        return not job.in_pipeline and self.step_cache.resolve(job.cache).off

    def denoise_cached(
        self, job: DenoiseJob, on_step: StepCallback | None = None, cancelled: threading.Event | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The request alone with its step-cache policy's hooks installed on the transformer for
        all its steps (removed after, whatever happens): latents, (blocks run, blocks skipped)."""
        policy = self.step_cache.resolve(job.cache)
        lane = self.lane(job, on_step, cancelled)
        self.loras.activate(list(job.loras))
        self.transformer.enable_cache(policy.config(len(lane.timesteps)))
        try:
            # eager: the cache hooks change the blocks' forward (compile.py)
            with AttentionCounter(self.transformer) as counter, eager(self.compile.enabled):
                latents = run_alone(self.transformer, lane)
        finally:
            self.transformer.disable_cache()
        return latents, (counter.run, counter.skipped)

    def lane(
        self, job: DenoiseJob, on_step: StepCallback | None = None, cancelled: threading.Event | None = None
    ) -> Lane:
        """The request prepared for the loop (on the model thread: it draws the noise)."""
        return Lane(self, job, on_step, cancelled)

    def denoise(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> torch.Tensor:
        """Run the request alone; returns packed latents (P*num_images, seq, 4*C). Raises
        `Cancelled` between steps once `cancelled` is set. (The service batches requests through
        `batching.Batcher`, which runs the same lanes together.)"""
        if job.in_pipeline:
            with eager(self.compile.enabled):  # the pipeline's own loop runs uncompiled (compile.py)
                return self._denoise_in_pipeline(job, on_step, cancelled)
        if not self.step_cache.resolve(job.cache).off:
            return self.denoise_cached(job, on_step, cancelled)[0]
        lane = self.lane(job, on_step, cancelled)
        # Adapters live in the shared transformer: switch them on the model thread, right before
        # this request's loop, so concurrent requests never see each other's set.
        self.loras.activate(list(job.loras))
        return run_alone(self.transformer, lane)

    def _denoise_in_pipeline(
        self,
        job: DenoiseJob,
        on_step: StepCallback | None = None,
        cancelled: threading.Event | None = None,
    ) -> torch.Tensor:
        """The pipeline's own `__call__` (Kontext, Control, IP-Adapter): the loop is diffusers'."""
        device, dtype = self.device.torch_device, self.device.dtype
        # diffusers repeats each prompt's embeddings num_images times (repeat + view); do the same
        # here so the batch matches the noise it draws for (P*num_images) latents.
        embeds = job.prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        pooled = job.pooled_prompt_embeds.to(device, dtype).repeat_interleave(job.num_images, dim=0)
        true_cfg = {}  # only when asked: FluxFillPipeline takes none of these arguments
        if job.true_cfg:
            true_cfg = {
                "negative_prompt_embeds": job.negative_prompt_embeds.to(device, dtype).repeat_interleave(
                    job.num_images, dim=0
                ),
                "negative_pooled_prompt_embeds": job.negative_pooled_prompt_embeds.to(device, dtype).repeat_interleave(
                    job.num_images, dim=0
                ),
                "true_cfg_scale": job.true_cfg_scale,
            }
        started = [time.perf_counter()]
        mode = self._mode(job)
        previewer = (
            Previewer(job.preview, job.width, job.height, self.vae_scale_factor, self.latent_channels)
            if job.preview is not None
            else None
        )

        def step_end(pipe, i, t, kwargs):
            now = time.perf_counter()
            if on_step is not None:
                # num_timesteps: the steps actually run (img2img-style pipelines cut by strength)
                preview = previewer.at(i + 1, pipe.scheduler) if previewer is not None else None
                on_step(i + 1, pipe.num_timesteps, now - started[0], preview)
            started[0] = now
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"cancelled after step {i + 1} of {job.steps}")
            return {}

        if cancelled is not None and cancelled.is_set():
            raise Cancelled("cancelled before the first step")
        # Adapters live in the shared transformer: switch them on the model thread, right before
        # this request's loop, so concurrent requests never see each other's set.
        self.loras.activate(list(job.loras))
        pipe = self.pipeline(mode.pipeline_class, x0=previewer is not None, **mode.components())
        geometry = Geometry(batch=embeds.shape[0], width=job.width, height=job.height, device=device, dtype=dtype)
        ip_adapter = pipeline_inputs(job.ip_adapter, device, dtype) if job.ip_adapter is not None else {}
        applied = self.ip_adapter.applied(pipe, job.ip_adapter.scale) if job.ip_adapter is not None else nullcontext()
        with applied:  # the IP-Adapter's processors in the transformer for this call only
            latents = pipe(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                width=job.width,
                height=job.height,
                num_inference_steps=job.steps,
                guidance_scale=job.guidance,
                num_images_per_prompt=1,
                output_type="latent",
                **mode.inputs(pipe, job.seed, geometry),  # the seeded generator, and the init image if any
                **true_cfg,
                **ip_adapter,
                callback_on_step_end=step_end,
                callback_on_step_end_tensor_inputs=[],
            ).images
        _check_converged(latents, job)
        return latents


def _check_converged(latents: torch.Tensor, job: DenoiseJob) -> None:
    """The denoiser's own output is checked here, so a run that diverged (inputs within their
    ranges can still combine badly) is named as what it is, by the stage that produced it,
    instead of reaching the vae as "NaN latents" it never made. Deterministic for the same
    request, so INVALID_ARGUMENT: retrying will not help, other inputs will."""
    if bool(torch.isfinite(latents).all()):
        return
    loras = ", ".join(f"{name}@{weight:g}" for name, weight in job.loras) or "none"
    cfg = f", true_cfg_scale {job.true_cfg_scale:g}" if job.true_cfg else ""
    raise InvalidArgument(
        "latents",
        f"denoising diverged: the latents hold NaN or Inf after {job.steps} steps "
        f"(guidance {job.guidance:g}{cfg}, LoRAs {loras}); lower guidance or LoRA weights",
    )
