"""Checks for images that arrive as bytes (init images, masks), shared by the orchestrator and the
vae stage: PNG or JPEG only, bounded in bytes and pixels, fully decodable, and masks that are
truly one channel. Errors are `InvalidArgument` naming the field. Pillow only, no torch.
"""

from __future__ import annotations

import io
import struct
import zlib

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
        if image.format == "PNG":
            _check_png_complete(data, image.width, image.height, field)
    except InvalidArgument:
        raise
    except UnidentifiedImageError:  # its message shows an in-memory file object, nothing useful
        raise InvalidArgument(field, "not a PNG or JPEG image (no known image format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InvalidArgument(field, f"not a decodable PNG/JPEG image ({error})") from None
    return image


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_complete(data: bytes, width: int, height: int, field: str) -> None:
    """Refuse a PNG whose pixel data ends before the last row.

    Pillow decodes what the IDAT stream holds and leaves the rest of the image black without a
    word when the stream *ends* early (a crafted or re-terminated file; a file merely cut short
    mid-stream Pillow does refuse). The check is the PNG rule itself: the inflated IDAT data is
    exactly one filter byte plus the packed pixels of every row (of every Adam7 pass).
    """
    header = data[16:29]  # IHDR follows the 8-byte signature and its own length and type
    if len(header) < 13:
        raise InvalidArgument(field, "PNG header is cut short")
    _, _, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    bits = depth * _PNG_CHANNELS.get(colour, 4)
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    expected = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            expected += rows * (1 + -(-columns * bits // 8))
    inflate, got, offset = zlib.decompressobj(), 0, 8
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if kind == b"IDAT":
            # Bounded: never inflate more than one byte past what the rows need (no zip bomb).
            got += len(inflate.decompress(data[offset + 8 : offset + 8 + length], expected + 1 - got))
        elif kind == b"IEND":
            break
        offset += 12 + length
    if got < expected:
        raise InvalidArgument(
            field, f"truncated PNG: pixel data for {got * 100 // expected}% of the image ({got} of {expected} bytes)"
        )


def check_mask(mask: Image.Image, init: Image.Image, field: str = "mask_image") -> None:
    """Same size as the init image, and one channel in truth (white = repaint)."""
    if mask.size != init.size:
        raise InvalidArgument(
            field, f"{mask.width}x{mask.height} differs from the init image's {init.width}x{init.height}"
        )
    if mask.mode in ONE_CHANNEL_MODES:
        return
    if mask.mode not in ("P", "PA", "RGB", "RGBA"):
        raise InvalidArgument(field, f"mode {mask.mode} cannot be read as a one-channel mask")
    r, g, b = mask.convert("RGB").split()
    spread = max(ImageChops.difference(x, y).getextrema()[1] for x, y in ((r, g), (g, b), (r, b)))
    if spread > MASK_CHANNEL_TOLERANCE:
        raise InvalidArgument(
            field,
            f"{mask.mode} image in colour (channels differ by up to {spread} levels); "
            "expected a grayscale or black-and-white mask",
        )
