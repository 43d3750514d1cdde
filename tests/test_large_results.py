"""Results that a stock gRPC client can receive (issue 10, item 21).

A client that nobody here wrote keeps gRPC's default 4 MiB receive limit. Eight 512x512 PNGs of
the tiny model's noise are ~6 MiB: in one Result that is RESOURCE_EXHAUSTED for such a client.
With `stream_images` the orchestrator sends each image in pieces of at most 1 MiB before a
Result without image bytes; the SDK asks for that and reassembles, so its Result is unchanged.
A request without the flag (a fluxmesh 0.1.0 client) still gets its images in the Result.
"""

from __future__ import annotations

import grpc
import pytest

from fluxmesh.client import Client
from fluxmesh.orchestrator.results import CHUNK_BYTES, image_chunks
from fluxmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc

STOCK_LIMIT = 4 * 1024 * 1024  # gRPC's default max_receive_message_length
BIG = {"prompt": "static on an old television", "width": 512, "height": 512, "steps": 1, "seed": 11}
EIGHT = generator_pb2.GenerateRequest(**BIG, num_images=8)


def _events(channel: grpc.Channel, request: generator_pb2.GenerateRequest) -> list[generator_pb2.GenerateEvent]:
    return list(generator_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=300))


@pytest.fixture(scope="module")
def streamed(dev_cluster) -> list[generator_pb2.GenerateEvent]:
    """The eight images asked for in pieces, over a stock channel (no options: 4 MiB limit)."""
    request = generator_pb2.GenerateRequest()
    request.CopyFrom(EIGHT)
    request.stream_images = True
    with grpc.insecure_channel(dev_cluster.address) as stock:
        return _events(stock, request)


def _reassembled(events: list[generator_pb2.GenerateEvent]) -> list[bytes]:
    images: dict[int, bytes] = {}
    for event in events:
        if event.WhichOneof("event") == "image_chunk":
            images[event.image_chunk.index] = images.get(event.image_chunk.index, b"") + event.image_chunk.data
    return [images[i] for i in sorted(images)]


def test_a_stock_client_receives_eight_large_images_in_pieces(streamed):
    result = streamed[-1]
    assert result.WhichOneof("event") == "result" and not result.result.images  # no image bytes in it
    assert result.result.seed == BIG["seed"] and (result.result.width, result.result.height) == (512, 512)
    pngs = _reassembled(streamed)
    assert len(pngs) == 8 and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)
    assert sum(map(len, pngs)) > STOCK_LIMIT  # what one Result would have held: too much for this client
    assert max(event.ByteSize() for event in streamed) <= CHUNK_BYTES + 1024
    chunks = [event.image_chunk for event in streamed if event.WhichOneof("event") == "image_chunk"]
    assert [c.index for c in chunks if c.last] == list(range(8)) and all(c.width == 512 for c in chunks)


def test_the_sdk_puts_the_pieces_back_into_its_result(dev_cluster, streamed):
    with Client(dev_cluster.address, timeout=300) as client:
        result = client.generate(**BIG, num_images=8)
    assert result.image_data == _reassembled(streamed)  # the same seed: the same PNGs, byte for byte
    assert len(result.images) == 8 and result.images[7].size == (512, 512)


def test_a_client_that_did_not_ask_gets_the_images_in_the_result(dev_cluster, streamed):
    """What a fluxmesh 0.1.0 client sends (no stream_images): one Result holding every image, as
    before; such a client raises its receive limit, as fluxmesh's own channels did."""
    with grpc.insecure_channel(dev_cluster.address) as stock, pytest.raises(grpc.RpcError) as refused:
        _events(stock, EIGHT)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with grpc.insecure_channel(
        dev_cluster.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as raised:
        events = _events(raised, EIGHT)
    assert not [e for e in events if e.WhichOneof("event") == "image_chunk"]
    assert [image.data for image in events[-1].result.images] == _reassembled(streamed)


@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 12 * CHUNK_BYTES + 5])
def test_pieces_are_in_order_bounded_and_whole(size):
    """12 MiB is a 2048x2048 PNG of noise (the largest side allowed): it crosses 4 MiB alone."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    images = [common_pb2.Image(width=8, height=4, data=data), common_pb2.Image(width=2, height=2, data=b"x")]
    chunks = list(image_chunks(images))
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert b"".join(c.data for c in chunks if c.index == 0) == data
    assert [(c.index, c.last) for c in chunks][-2:] == [(0, True), (1, True)]
    assert sum(c.last for c in chunks) == 2
