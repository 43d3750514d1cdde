"""Images in the format the request asked for.

PNG is passed on exactly as the vae stage encoded it (so an image through the gateway is
byte-equal to the SDK's); jpeg and webp are re-encoded with Pillow at `output_compression`.
"""

from __future__ import annotations

import io

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 95  # Pillow's advice: above 95 JPEG grows without looking better


def encode(data: bytes, output_format: str, compression: int | None = None) -> bytes:
    """`data` (PNG or JPEG bytes) as `output_format`."""
    source = Image.open(io.BytesIO(data))
    if source.format == output_format.upper() and (output_format == "png" or compression is None):
        return data
    image = source.convert("RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "webp" and compression == 100:
        image.save(buffer, format="WEBP", lossless=True)
    else:
        image.save(
            buffer, format=output_format.upper(), quality=DEFAULT_QUALITY if compression is None else compression
        )
    return buffer.getvalue()
