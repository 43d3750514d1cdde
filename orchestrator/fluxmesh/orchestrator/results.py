"""How a finished request's images reach the client: in the Result, or in pieces before it.

A stock gRPC client accepts messages of at most 4 MiB. Eight 512x512 PNGs already exceed that in
one Result, and a single 2048x2048 PNG of noise is 12 MiB, so one event per image is not enough
either: with `stream_images` each image goes as ImageChunk events of at most `CHUNK_BYTES`, and
the Result follows without image bytes. Clients that did not ask (fluxmesh 0.1.0 knows no
ImageChunk event) get the images in the Result, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from fluxmesh.v1 import common_pb2, generator_pb2

# Well under the 4 MiB default with the event's other fields, and small enough that a slow
# client holds the stream no longer per message than a step event does.
CHUNK_BYTES = 1 << 20


def image_chunks(images: Sequence[common_pb2.Image]) -> Iterator[generator_pb2.ImageChunk]:
    """Each image as pieces of at most CHUNK_BYTES, in order; an empty image is one empty piece."""
    for index, image in enumerate(images):
        data = image.data
        starts = range(0, max(len(data), 1), CHUNK_BYTES)
        for start in starts:
            yield generator_pb2.ImageChunk(
                index=index,
                width=image.width,
                height=image.height,
                format=image.format,
                data=data[start : start + CHUNK_BYTES],
                last=start == starts[-1],
            )
