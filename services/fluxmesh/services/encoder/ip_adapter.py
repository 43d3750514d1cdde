"""XLabs IP-Adapter image prompts, the encoder's half: CLIP vision image embeds, as FluxPipeline makes them.

The encoder is started with `--ip-adapter-image-encoder FOLDER`, a local CLIPVisionModelWithProjection
folder (XLabs' adapter takes openai/clip-vit-large-patch14's). The adapter file itself is the
denoiser's (`--ip-adapter`): each stage reads only the weights it runs, so each has its own flag.

`embed` calls `FluxPipeline.encode_image` on a pipeline holding only this model and the image
processor `FluxIPAdapterMixin.load_ip_adapter` makes (`CLIPImageProcessor(size=crop_size=image_size)`,
whatever the folder's preprocessor_config.json says), so the preprocessing and the projection are
diffusers' code. An empty image is FluxPipeline's default negative image prompt:
`np.zeros((width, height, 3))`, black, at the output size (the pipeline's own axis order kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from fluxmesh import contract
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument, NotFound
from fluxmesh.rpc.images import open_image
from fluxmesh.services.runtime.memory import module_bytes
from fluxmesh.v1 import encoder_pb2

__all__ = ["IpAdapterImage", "IpAdapterImageEncoder", "ip_adapter_image_from_pb"]


@dataclass(frozen=True)
class IpAdapterImage:
    image: Image.Image | None  # RGB; None: the pipeline's black default negative
    width: int = 0
    height: int = 0


def ip_adapter_image_from_pb(request: encoder_pb2.EncodeRequest) -> IpAdapterImage | None:
    """The request's image prompt decoded, or the black image's size checked; errors name the field."""
    if not request.HasField("ip_adapter_image"):
        return None
    message, field = request.ip_adapter_image, "ip_adapter_image"
    if message.image:
        if message.width or message.height:
            raise InvalidArgument(f"{field}.width", "applies only to the black default image (an empty image)")
        # RGB, as CLIPImageProcessor converts (do_convert_rgb)
        return IpAdapterImage(open_image(message.image, f"{field}.image").convert("RGB"))
    for name in ("width", "height"):
        side = getattr(message, name)
        if not contract.LIMITS.min_side <= side <= contract.LIMITS.max_side:
            raise InvalidArgument(
                f"{field}.{name}",
                f"{side}: the black default image needs the output size, "
                f"within [{contract.LIMITS.min_side}, {contract.LIMITS.max_side}]",
            )
    return IpAdapterImage(None, message.width, message.height)


class IpAdapterImageEncoder:
    """The CLIP vision model of one folder; weights read by `load` and dropped by `drop` with the
    encoder's own (sequential mode moves them together)."""

    def __init__(self, folder: Path):
        if not (folder / "config.json").is_file():
            raise NotFound(f"--ip-adapter-image-encoder {folder}: no config.json (a local CLIP vision model folder)")
        self.folder = folder
        config = CLIPVisionConfig.from_pretrained(folder, local_files_only=True)  # a CLIPConfig's vision part too
        self.embed_dim = int(config.projection_dim)
        if not self.embed_dim:
            raise FailedPrecondition(f"--ip-adapter-image-encoder {folder}: the model has no image projection")
        size = int(config.image_size)
        self.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)
        self.model: CLIPVisionModelWithProjection | None = None

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        # use_safetensors: pickled .bin weights are refused, never unpickled.
        model = CLIPVisionModelWithProjection.from_pretrained(
            self.folder, torch_dtype=dtype, local_files_only=True, use_safetensors=True
        )
        self.model = model.to(device).eval()

    def drop(self) -> None:
        self.model = None

    def modules(self) -> list[torch.nn.Module]:
        return [self.model] if self.model is not None else []

    def weight_bytes(self) -> int:
        return module_bytes(self.model)

    def embed(self, prompt: IpAdapterImage) -> torch.Tensor:
        """(1, embed_dim): FluxPipeline.encode_image of the image (or of the black default)."""
        pipe = FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=None,
            image_encoder=self.model,
            feature_extractor=self.feature_extractor,
        )
        image = prompt.image if prompt.image is not None else np.zeros((prompt.width, prompt.height, 3), np.uint8)
        with torch.no_grad():  # as the pipeline's __call__
            return pipe.encode_image(image, self.model.device, 1)
