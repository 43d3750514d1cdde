"""Depth maps for FLUX.1-Depth control images, on the server, with a transformers depth model.

The map is what transformers' "depth-estimation" pipeline makes of the image (its own
preprocessing, the model, `post_process_depth_estimation` back to the image's size, min-max
normalised to 8 bits), repeated to RGB as the Canny map is: the control image a user would
otherwise make by hand before FluxControlPipeline. The model is a DepthAnything or DPT folder in
its published layout (config.json, model.safetensors, preprocessor_config.json); it lives on the
vae stage beside the AutoencoderKL, loaded and released with it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument

__all__ = ["DepthEstimator"]

log = logging.getLogger(__name__)

_SERVED = ("depth_anything", "dpt")  # DepthAnythingForDepthEstimation (V1 and V2), DPTForDepthEstimation


class DepthEstimator:
    def __init__(self, folder: Path, dtype: torch.dtype = torch.float32):
        config = folder / "config.json"
        if not config.is_file() or not (folder / "preprocessor_config.json").is_file():
            raise InvalidArgument("depth_model", f"{folder}: expected config.json and preprocessor_config.json")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type not in _SERVED:
            raise InvalidArgument("depth_model", f"{folder}: model_type {model_type!r}; served: {', '.join(_SERVED)}")
        if not any(folder.glob("*.safetensors")):
            raise InvalidArgument("depth_model", f"{folder}: no .safetensors weights (nothing is unpickled)")
        self.folder = folder
        self.dtype = dtype
        self.model: torch.nn.Module | None = None
        self._processor = None

    def load(self, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        model = AutoModelForDepthEstimation.from_pretrained(
            self.folder, torch_dtype=self.dtype, local_files_only=True, use_safetensors=True
        )
        self.model = model.to(device).eval()
        self._processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        log.info("vae: depth model %s (%s)", self.folder, model.config.model_type)

    def drop(self) -> None:
        self.model = self._processor = None

    def estimate(self, image: Image.Image) -> Image.Image:
        from transformers import pipeline

        if self.model is None:
            raise FailedPrecondition("preprocess: the depth model is not loaded")
        # made per call (no weights read): it runs where the stage's residency has the model now
        estimate = pipeline(
            "depth-estimation", model=self.model, image_processor=self._processor, device=self.model.device
        )
        depth = estimate(image.convert("RGB"))["depth"]
        return Image.fromarray(np.repeat(np.asarray(depth)[:, :, None], 3, axis=2))
