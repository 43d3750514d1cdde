"""Checks for images that arrive as bytes (init images, masks), shared by the orchestrator and the
vae stage: PNG or JPEG only, bounded in bytes and pixels, fully decodable, and masks that are
truly one channel. Errors are `InvalidArgument` naming the field. Pillow only, no torch.
"""

from __future__ import annotations

import io

from PIL import Image, ImageChops, UnidentifiedImageError

from fluxmesh.rpc.errors import InvalidArgument

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_SIDE = 4096  # per side, checked from the header before any pixel is decoded
FORMATS = ("PNG", "JPEG")
ONE_CHANNEL_MODES = ("1", "L", "LA", "I", "I;16", "F")  # LA: the alpha is ignored, as diffusers does
# A mask saved as RGB(A) or palette is fine when its colour channels agree; JPEG's chroma
# rounding leaves a few levels of difference on gray, a colour image far more.
MASK_CHANNEL_TOLERANCE = 8


def open_image(data: bytes, field: str) -> Image.Image:
    """Decode PNG/JPEG bytes completely, refusing other formats, oversized or truncated files."""
    if not data:
        raise InvalidArgument(field, "is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(field, f"{len(data)} bytes exceeds the limit of {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise InvalidArgument(field, f"{image.format} image; expected PNG or JPEG")
        if image.width > MAX_IMAGE_SIDE or image.height > MAX_IMAGE_SIDE:
            raise InvalidArgument(field, f"{image.width}x{image.height} exceeds {MAX_IMAGE_SIDE} pixels per side")
        image.load()
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InvalidArgument(field, f"not a decodable PNG/JPEG image ({error})") from None
    return image


def check_mask(mask: Image.Image, init: Image.Image, field: str = "mask_image") -> None:
    """Same size as the init image, and one channel in truth (white = repaint)."""
    if mask.size != init.size:
        raise InvalidArgument(field, f"{mask.width}x{mask.height} differs from the init image's "
                                     f"{init.width}x{init.height}")
    if mask.mode in ONE_CHANNEL_MODES:
        return
    if mask.mode not in ("P", "PA", "RGB", "RGBA"):
        raise InvalidArgument(field, f"mode {mask.mode} cannot be read as a one-channel mask")
    r, g, b = mask.convert("RGB").split()
    spread = max(ImageChops.difference(x, y).getextrema()[1] for x, y in ((r, g), (g, b), (r, b)))
    if spread > MASK_CHANNEL_TOLERANCE:
        raise InvalidArgument(field, f"{mask.mode} image in colour (channels differ by up to {spread} levels); "
                                     "expected a grayscale or black-and-white mask")
