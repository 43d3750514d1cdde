"""The OpenAI images API's request and response bodies, plus fluxmesh's own knobs as extra fields.

Unknown fields are refused (400 naming the field) rather than ignored: a misspelt `seeed` would
otherwise silently give a random image. OpenAI fields with no FLUX meaning (`quality`,
`moderation`) are accepted and have no effect, so unmodified OpenAI clients keep working.
Range checks the orchestrator makes anyway (size multiples, steps, n <= 8, LoRA weights) are
left to it: one rule in one place; its answer comes back naming the OpenAI field.
"""

from __future__ import annotations

import json
import re
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fluxmesh.contract import LIMITS, PreviewKind

OutputFormat = Literal["png", "jpeg", "webp"]
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


class ImageOptions(BaseModel):
    """What generations and edits share."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted: that one.")
    n: int = Field(1, ge=1, description="Images from this prompt (the server allows up to 8).")
    size: str = Field(
        "auto",
        description="'WIDTHxHEIGHT' (multiples of the model's granularity) or 'auto' "
        "(1024x1024, or the input image's size for edits).",
    )
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="url: the gateway keeps the image for a while and returns where to fetch it."
    )
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(
        None, ge=0, le=100, description="jpeg/webp quality (default 95; webp 100 is lossless)."
    )
    stream: bool = Field(False, description="Server-sent events: partial images, then the completed image.")
    partial_images: int = Field(
        0,
        ge=0,
        le=LIMITS.max_steps,
        description="Partial images to stream before the final one (OpenAI allows 0-3; fluxmesh up to one per step).",
    )
    user: str | None = None
    quality: Literal["auto", "low", "medium", "high", "standard", "hd"] | None = Field(
        None, description="Accepted for compatibility; FLUX's quality knob is `steps`."
    )
    background: Literal["auto", "opaque"] | None = Field(None, description="FLUX images are always opaque.")
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted for compatibility; no effect.")
    safety_identifier: str | None = None

    # fluxmesh's own knobs (the official SDK sends them with `extra_body=`)
    seed: int | None = Field(None, ge=0, lt=2**64, description="Same seed, same pixels (as diffusers).")
    steps: int | None = Field(None, description="Denoising steps (default 28 dev, 4 schnell).")
    guidance: float | None = Field(None, description="Guidance (default 3.5; schnell ignores it).")
    negative_prompt: str | None = Field(None, description="True CFG: with true_cfg_scale > 1.")
    true_cfg_scale: float | None = None
    prompt_2: str = Field("", description="Separate T5 prompt.")
    max_sequence_length: int = Field(0, ge=0, description="T5 length (0: the encoder's default).")
    loras: list[LoraSpec | str] = Field(
        default_factory=list, description="Stacked LoRAs: {name, weight} or 'NAME[:WEIGHT]' (GET /v1/loras)."
    )
    priority: int = Field(0, description="Higher runs first when requests wait (up to what the server allows).")
    cache: str | None = Field(
        None,
        description="Step caching: off, first-block, mag or taylorseer, optionally "
        ":THRESHOLD (faster, approximate pixels; default: the server's).",
    )
    preview: PreviewKind = Field(PreviewKind.fast, description="How partial images are made.")
    progress: bool = Field(False, description="With stream: also `fluxmesh.step` / `fluxmesh.queued` events.")
    timeout: float | None = Field(None, gt=0, description="Deadline in seconds (504 when it passes).")

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        if value != "auto" and not SIZE.match(value):
            raise ValueError(f"{value!r} is neither 'WIDTHxHEIGHT' nor 'auto'")
        return value

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_text(cls, value):
        """A multipart form carries `loras` as a JSON list in one field (FastAPI hands a list field
        its values as a list of strings), or as repeated NAME[:WEIGHT] fields."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            return value
        loras: list = []
        for item in texts:
            if isinstance(item, str) and item.lstrip().startswith("["):
                try:
                    parsed = json.loads(item)
                except json.JSONDecodeError as error:
                    raise ValueError(f"not a JSON list ({error.msg})") from None
                loras += parsed if isinstance(parsed, list) else [parsed]
            elif item != "":
                loras.append(item)
        return loras

    def dimensions(self) -> tuple[int, int]:
        """(width, height); (0, 0) lets the orchestrator choose (1024, or the input image's size)."""
        match = SIZE.match(self.size)
        return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


class ImageGenerationRequest(ImageOptions):
    """POST /v1/images/generations (JSON)."""


class ImageEditRequest(ImageOptions):
    """POST /v1/images/edits (multipart/form-data)."""

    image: UploadFile = Field(description="PNG or JPEG to start from.")
    mask: UploadFile | None = Field(None, description="PNG or JPEG, white = repaint (inpainting).")
    strength: float | None = Field(None, description="How much to repaint, in (0, 1] (default 0.6).")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class Generation(BaseModel):
    """What fluxmesh adds to OpenAI's answer: enough to reproduce the image."""

    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    timings: dict[str, float]
    warnings: list[str] = []
    blocks_skipped: int = Field(0, description="Step caching: attention block computations skipped, and run.")
    blocks_run: int = 0


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str
    background: Literal["opaque"] = "opaque"
    fluxmesh: Generation


class PartialImageEvent(BaseModel):
    """SSE `image_generation.partial_image` (`image_edit.partial_image` for edits)."""

    type: str
    b64_json: str
    created_at: int
    output_format: OutputFormat
    size: str
    partial_image_index: int
    background: Literal["opaque"] = "opaque"
    quality: str = "auto"
    step: int = Field(description="fluxmesh: the step this preview shows.")


class CompletedEvent(BaseModel):
    """SSE `image_generation.completed` (`image_edit.completed`), one per image."""

    type: str
    b64_json: str | None = None
    url: str | None = None
    created_at: int
    output_format: OutputFormat
    size: str
    background: Literal["opaque"] = "opaque"
    quality: str = "auto"
    fluxmesh: Generation


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "fluxmesh"
    kind: Literal["dev", "schnell", "fill"]
    size_multiple: int
    guidance_embeds: bool
    source: str = Field(description="The model folder or Hub id the stages loaded.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Lora(BaseModel):
    name: str
    size_bytes: int
    cached: bool


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Lora]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
