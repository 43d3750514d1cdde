"""FLUX.1-Redux image prompts: SigLIP + the Redux image embedder, run by FluxPriorReduxPipeline itself.

A Redux folder is laid out as black-forest-labs/FLUX.1-Redux-dev publishes it: `image_encoder/`
(SiglipVisionModel), `feature_extractor/` (SiglipImageProcessor) and `image_embedder/`
(ReduxImageEncoder). The encoder stage builds a `FluxPriorReduxPipeline` from them and its own
CLIP and T5, and calls it, so the image preprocessing, the token append to the T5 sequence, the
per-image scales and the weighted sum are diffusers' code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FluxPriorReduxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionModel

from fluxmesh.contract import LIMITS
from fluxmesh.rpc.errors import FailedPrecondition
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.memory import module_bytes

__all__ = ["ImagePrompt", "ReduxImages"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePrompt:
    image: Image.Image  # RGB
    scale: float  # prompt_embeds_scale
    pooled_scale: float  # pooled_prompt_embeds_scale


class ReduxImages:
    """The Redux models of one folder; weights read by `load` and dropped by `drop` with the
    encoder's own (sequential mode moves them together)."""

    def __init__(self, folder: Path, *, joint_attention_dim: int):
        self.folder = folder
        self.feature_extractor = SiglipImageProcessor.from_pretrained(
            folder, subfolder="feature_extractor", local_files_only=True
        )
        embedder = model_folder.read_config(folder, "image_embedder")
        if int(embedder["txt_in_features"]) != joint_attention_dim:
            raise FailedPrecondition(
                f"redux {folder}: image_embedder txt_in_features {embedder['txt_in_features']} "
                f"!= the model's T5 width {joint_attention_dim}"
            )
        vision = model_folder.read_config(folder, "image_encoder")
        self.tokens = (int(vision["image_size"]) // int(vision["patch_size"])) ** 2
        if self.tokens > LIMITS.max_image_prompt_tokens:
            raise FailedPrecondition(
                f"redux {folder}: {self.tokens} image tokens exceed {LIMITS.max_image_prompt_tokens}"
            )
        self.image_encoder: SiglipVisionModel | None = None
        self.image_embedder: ReduxImageEncoder | None = None

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        # use_safetensors: pickled .bin weights are refused, never unpickled.
        encoder = SiglipVisionModel.from_pretrained(
            self.folder, subfolder="image_encoder", torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
        embedder = ReduxImageEncoder.from_pretrained(
            self.folder, subfolder="image_embedder", torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
        self.image_encoder, self.image_embedder = encoder.to(device).eval(), embedder.to(device).eval()

    def drop(self) -> None:
        self.image_encoder = self.image_embedder = None

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.image_encoder, self.image_embedder) if m is not None]

    def weight_bytes(self) -> int:
        return module_bytes(self.image_encoder, self.image_embedder)

    def embed(
        self,
        text_pipe,
        prompt: str | None,
        prompt_2: str | None,
        images: list[ImagePrompt],
        zero_text_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (1, L + T, D), pooled (1, D_pooled)) as FluxPriorReduxPipeline returns them.

        `zero_text_shapes`: the text embeddings are zeros of these shapes per image, as the pipeline
        makes them when it has no text encoders (it hard-codes FLUX.1's 512 x 4096 and 768; these are
        the model's own widths)."""
        pipe = FluxPriorReduxPipeline(
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            image_embedder=self.image_embedder,
            text_encoder=text_pipe.text_encoder,
            tokenizer=text_pipe.tokenizer,
            text_encoder_2=text_pipe.text_encoder_2,
            tokenizer_2=text_pipe.tokenizer_2,
        )
        pipe.set_progress_bar_config(disable=True)
        n = len(images)
        text = {}
        if zero_text_shapes is not None:
            dtype = self.image_embedder.dtype
            sequence, pooled = zero_text_shapes
            text = {
                "prompt_embeds": torch.zeros((n, *sequence), dtype=dtype),
                "pooled_prompt_embeds": torch.zeros((n, *pooled), dtype=dtype),
            }
        else:
            text = {"prompt": [prompt] * n, "prompt_2": [prompt_2] * n if prompt_2 else None}
        out = pipe(
            image=[i.image for i in images],
            **text,
            prompt_embeds_scale=[i.scale for i in images],
            pooled_prompt_embeds_scale=[i.pooled_scale for i in images],
        )
        return out.prompt_embeds, out.pooled_prompt_embeds
