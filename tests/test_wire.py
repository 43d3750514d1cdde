"""Tensor bytes on the wire: codec round trips and the T5-sized hop through every limit."""

from __future__ import annotations

import pytest
import torch

from factories import PROMPT, max_abs_diff, reference_images
from fluxmesh.client import Client
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.runtime.tensors import from_pb, to_pb


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_tensor_round_trip_is_bit_exact(dtype):
    source = (torch.randn(2, 3, 5) * 100).to(dtype)
    message = to_pb(source)
    assert len(message.data) == source.numel() * source.element_size()
    assert torch.equal(from_pb(message, "t"), source)


def test_views_into_larger_storage_send_only_their_own_elements():
    base = torch.arange(20.0)
    for view in (base[3:7], base.reshape(4, 5)[:, 1], base.reshape(4, 5).t()):
        assert torch.equal(from_pb(to_pb(view), "t"), view)


def test_non_finite_values_are_rejected():
    with pytest.raises(InvalidArgument, match="t.data: contains NaN or Inf"):
        from_pb(to_pb(torch.tensor([1.0, float("nan")])), "t")


def test_absurd_shape_is_rejected_before_allocating():
    message = to_pb(torch.zeros(2))
    message.shape[:] = [1 << 20, 1 << 20]
    with pytest.raises(InvalidArgument, match="t.shape"):
        from_pb(message, "t")


@pytest.fixture(scope="module")
def wide_t5_model(tmp_path_factory):
    """A tiny model whose T5 has T5-XXL's width: its embeddings are 512x4096, as FLUX.1-dev's."""
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "wide-t5", t5_width=4096)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_t5_xxl_sized_embedding_passes_every_hop(wide_t5_model, dtype):
    """512x4096 is 8 MiB in fp32 and 4 MiB in bf16, both at or over gRPC's 4 MiB default."""
    from mesh import Mesh

    with Mesh(wide_t5_model, stage_args=["--dtype", dtype]).start_all() as cluster:
        with Client(cluster.address, timeout=120) as client:
            info = {s.stage: s for s in client.info().stages}
            result = client.generate(PROMPT, width=64, height=64, steps=2, guidance=3.5, seed=5)
    assert info["encoder"].dtype == dtype
    assert result.image.size == (64, 64)
    if dtype == "float32":
        expected = reference_images(wide_t5_model, width=64, height=64, steps=2, guidance=3.5, seed=5)
        assert max_abs_diff(result.image, expected[0]) <= 1
