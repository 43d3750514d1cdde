"""Preview images as the stages make them: small JPEGs, looked at once and never kept.

Plain bytes with their size, no protobuf: the servicers put them in `fluxmesh.v1.Image`s.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG_QUALITY = 85


@dataclass(frozen=True)
class Jpeg:
    width: int
    height: int
    data: bytes


def encode_jpeg(image: Image.Image | np.ndarray) -> Jpeg:
    """A PIL image or a uint8 (h, w, 3) RGB array as a JPEG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Jpeg(image.width, image.height, buffer.getvalue())
