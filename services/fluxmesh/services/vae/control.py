"""Control-image preprocessing on the server, as users otherwise do with controlnet_aux.

Canny edges are OpenCV's `cv2.Canny` on the RGB image at its own size with controlnet_aux's
CannyDetector thresholds (100, 200), the one-channel edge map repeated to RGB (its HWC3); the
pipeline's own preprocessing then resizes it to the output size like any control image. Depth
maps come from the stage's depth model (depth.py), when one is configured.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.v1 import common_pb2

__all__ = ["CANNY_THRESHOLDS", "canny", "preprocess", "require_depth"]

CANNY_THRESHOLDS = (100, 200)  # controlnet_aux.CannyDetector's defaults


def canny(image: Image.Image) -> Image.Image:
    import cv2  # opencv-python-headless: the stages extra

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


def require_depth(
    depth: Callable[[Image.Image], Image.Image] | None, field: str = "preprocess"
) -> Callable[[Image.Image], Image.Image]:
    if depth is None:
        raise FailedPrecondition(
            f"{field}: CONTROL_PREPROCESS_DEPTH needs a depth model; none is configured (vae --depth-model)"
        )
    return depth


def preprocess(
    image: Image.Image,
    kind: int,
    field: str = "preprocess",
    depth: Callable[[Image.Image], Image.Image] | None = None,
) -> Image.Image:
    if kind == common_pb2.CONTROL_PREPROCESS_NONE:
        return image
    if kind == common_pb2.CONTROL_PREPROCESS_CANNY:
        return canny(image)
    if kind == common_pb2.CONTROL_PREPROCESS_DEPTH:
        return require_depth(depth, field)(image)
    raise InvalidArgument(field, f"{kind} is not a ControlPreprocess")
