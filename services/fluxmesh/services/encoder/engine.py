"""CLIP-L pooled output + T5 sequence embeddings, exactly as FluxPipeline.encode_prompt.

The engine wraps a text-encoders-only `FluxPipeline` and calls its own `encode_prompt`, so the
tokenisation (padding to max length, truncation), the T5 run on the padded sequence with no
attention mask and CLIP's `pooler_output` are diffusers' code, not a copy of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from fluxmesh import contract
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.encoder.ip_adapter import IpAdapterImage, IpAdapterImageEncoder
from fluxmesh.services.encoder.redux import ImagePrompt, ReduxImages
from fluxmesh.services.loras.stage import LoraList, StageLoras
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.device import Device
from fluxmesh.services.runtime.fingerprint import files_fingerprint
from fluxmesh.services.runtime.memory import module_bytes

log = logging.getLogger(__name__)


@dataclass
class Embeddings:
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_prompt_embeds: torch.Tensor  # (B, D_pooled)
    truncated_tokens: list[int]  # per prompt, T5 tokens dropped by truncation
    ip_adapter_image_embeds: torch.Tensor | None = None  # (1, D): the IP-Adapter image prompt's CLIP embeds


class TextEncoderEngine:
    def __init__(
        self,
        folder: Path,
        device: Device,
        *,
        max_sequence_length: int | None = None,
        t5_gguf: Path | None = None,
        lora_dir: Path | None = None,
        redux: Path | None = None,
        ip_adapter_image_encoder: Path | None = None,
        load: bool = True,
    ):
        """`load=False` leaves the weights unread: the stage's `Residency` loads them when told.
        `redux`: a FLUX.1-Redux folder, for image prompts (see encoder/redux.py).
        `ip_adapter_image_encoder`: a CLIP vision folder, for IP-Adapter image prompts (ip_adapter.py)."""
        self.folder = folder
        self.device = device
        self.t5_gguf = t5_gguf
        self.default_max_sequence_length = max_sequence_length or model_folder.default_max_sequence_length(folder)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        self.tokenizer_2 = T5TokenizerFast.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True)
        self.pipe = self._pipeline(None, None)  # tokenizers only until the weights are loaded
        self.loras = StageLoras(lora_dir, None, "text_encoder")  # bound to each CLIP loaded
        self.lora_dir = lora_dir
        # Widths of the zero text embeddings a Redux request without a prompt gets (from the configs)
        self.text_widths = (
            int(model_folder.read_config(folder, "text_encoder_2")["d_model"]),
            int(model_folder.read_config(folder, "text_encoder")["projection_dim"]),
        )
        self.redux = ReduxImages(redux, joint_attention_dim=self.text_widths[0]) if redux is not None else None
        self.ip_adapter = IpAdapterImageEncoder(ip_adapter_image_encoder) if ip_adapter_image_encoder else None
        log.info(
            "encoder: CLIP + T5%s from %s for %s, T5 length %d, LoRAs: %s",
            f" (GGUF {t5_gguf})" if t5_gguf else "",
            folder,
            device.describe(),
            self.default_max_sequence_length,
            lora_dir or "none",
        )
        if load:
            self.load_weights(device.torch_device)

    def _pipeline(self, clip: CLIPTextModel | None, t5: T5EncoderModel | None) -> FluxPipeline:
        pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=clip,
            tokenizer=self.tokenizer,
            text_encoder_2=t5,
            tokenizer_2=self.tokenizer_2,
            transformer=None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def load_weights(self, device: torch.device) -> None:
        """Read CLIP and T5 from the model files onto `device` (CPU for an offloaded start)."""
        folder, dtype = self.folder, self.device.dtype
        # use_safetensors: a folder with only pickled .bin weights is refused, never unpickled.
        clip = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
        if self.t5_gguf is not None:
            from fluxmesh.services.gguf import load_gguf_t5

            t5 = load_gguf_t5(self.t5_gguf, folder, dtype=dtype)
        else:
            t5 = T5EncoderModel.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True, use_safetensors=True
            )
        if self.redux is not None:
            self.redux.load(device, dtype)
        if self.ip_adapter is not None:
            self.ip_adapter.load(device, dtype)
        self.pipe = self._pipeline(clip.to(device).eval(), t5.to(device).eval())
        self.loras.bind(self.pipe.text_encoder)

    def drop_weights(self) -> None:
        self.loras.bind(None)
        self.pipe = self._pipeline(None, None)
        if self.redux is not None:
            self.redux.drop()
        if self.ip_adapter is not None:
            self.ip_adapter.drop()

    def weight_modules(self) -> list[torch.nn.Module]:
        redux = self.redux.modules() if self.redux is not None else []
        ip_adapter = self.ip_adapter.modules() if self.ip_adapter is not None else []
        return [m for m in (self.pipe.text_encoder, self.pipe.text_encoder_2) if m is not None] + redux + ip_adapter

    def weight_bytes(self) -> int:
        redux = self.redux.weight_bytes() if self.redux is not None else 0
        ip_adapter = self.ip_adapter.weight_bytes() if self.ip_adapter is not None else 0
        return module_bytes(self.pipe.text_encoder, self.pipe.text_encoder_2) + redux + ip_adapter

    def identity(self) -> str:
        """What the embeddings depend on besides the request (the prompt cache's key, through
        Info): the files read, dtype, device kind, default T5 length and the LoRA files."""
        folder = self.folder
        return files_fingerprint(
            [folder / sub for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")]
            + [self.t5_gguf, self.lora_dir]
            + (
                [self.redux.folder / sub for sub in ("image_embedder", "image_encoder", "feature_extractor")]
                if self.redux is not None
                else []
            )
            + ([self.ip_adapter.folder] if self.ip_adapter is not None else []),
            str(self.device.dtype),
            self.device.torch_device.type,
            self.default_max_sequence_length,
        )

    def check(
        self, prompts: list[str], prompts_2: list[str], max_sequence_length: int, image_prompts: list[ImagePrompt] = ()
    ) -> int:
        """Validate an encode request's prompts; returns the sequence length to use."""
        contract.check_prompt_count(len(prompts))
        if prompts_2 and len(prompts_2) != len(prompts):
            raise InvalidArgument("prompts_2", f"{len(prompts_2)} entries for {len(prompts)} prompts")
        for field, values in (("prompts", prompts), ("prompts_2", prompts_2)):
            for i, text in enumerate(values):
                contract.check_prompt_text(f"{field}[{i}]", text)
        if image_prompts:
            self._check_image_prompts(prompts, image_prompts, max_sequence_length)
            return contract.REDUX_SEQUENCE_LENGTH
        length = max_sequence_length or self.default_max_sequence_length
        contract.check_sequence_length("max_sequence_length", length)
        return length

    def _check_image_prompts(
        self, prompts: list[str], image_prompts: list[ImagePrompt], max_sequence_length: int
    ) -> None:
        if self.redux is None:
            raise InvalidArgument("image_prompts", "this encoder has no Redux image encoder (start it with --redux)")
        if len(prompts) != 1:
            raise InvalidArgument(
                "prompts", f"{len(prompts)} prompts with image prompts; FluxPriorReduxPipeline takes one"
            )
        limit = contract.LIMITS.max_redux_images
        if len(image_prompts) > limit:
            raise InvalidArgument("image_prompts", f"{len(image_prompts)} images; the limit is {limit}")
        if max_sequence_length not in (0, contract.REDUX_SEQUENCE_LENGTH):
            raise InvalidArgument(
                "max_sequence_length",
                f"{max_sequence_length}: with image prompts the T5 part is "
                f"{contract.REDUX_SEQUENCE_LENGTH} tokens, as "
                "FluxPriorReduxPipeline's",
            )
        for i, prompt in enumerate(image_prompts):
            for field in ("scale", "pooled_scale"):
                contract.check_redux_scale(f"image_prompts[{i}].{field}", getattr(prompt, field))

    def encode(
        self,
        prompts: list[str],
        prompts_2: list[str],
        max_sequence_length: int,
        loras: LoraList = (),
        image_prompts: list[ImagePrompt] = (),
        zero_text: bool = False,
        ip_adapter_image: IpAdapterImage | None = None,
    ) -> Embeddings:
        embeddings = self._encode_text(prompts, prompts_2, max_sequence_length, loras, image_prompts, zero_text)
        if ip_adapter_image is not None:
            embeddings.ip_adapter_image_embeds = self.ip_adapter.embed(ip_adapter_image)
        return embeddings

    def check_ip_adapter_image(self, image: IpAdapterImage | None) -> None:
        if image is not None and self.ip_adapter is None:
            raise InvalidArgument(
                "ip_adapter_image", "this encoder has no CLIP vision model (start it with --ip-adapter-image-encoder)"
            )

    def _encode_text(
        self,
        prompts: list[str],
        prompts_2: list[str],
        max_sequence_length: int,
        loras: LoraList,
        image_prompts: list[ImagePrompt],
        zero_text: bool,
    ) -> Embeddings:
        self.loras.activate(list(loras))
        if image_prompts:
            zero_shapes = ((max_sequence_length, self.text_widths[0]), (self.text_widths[1],)) if zero_text else None
            embeds, pooled = self.redux.embed(
                self.pipe, prompts[0], prompts_2[0] if prompts_2 else None, list(image_prompts), zero_shapes
            )
            truncated = [0] if zero_text else self._truncated(prompts_2 or prompts, max_sequence_length)
            return Embeddings(embeds, pooled, truncated)
        prompt_embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=prompts_2 or None,
            device=self.device.torch_device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
        return Embeddings(prompt_embeds, pooled, self._truncated(prompts_2 or prompts, max_sequence_length))

    def _truncated(self, prompts: list[str], max_sequence_length: int) -> list[int]:
        # T5 counts as the truncation that matters: CLIP only contributes a pooled vector.
        lengths = self.pipe.tokenizer_2(prompts, padding=False, truncation=False)["input_ids"]
        return [max(0, len(ids) - max_sequence_length) for ids in lengths]
