"""The one interceptor that turns exceptions into statuses: only a method nobody implemented is
UNIMPLEMENTED; a NotImplementedError from inside a handler (torch raises them for dtypes it has
no kernel for) is a server fault, INTERNAL, logged with its traceback."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch

from fluxmesh.rpc.interceptors import ErrorMappingInterceptor
from fluxmesh.v1 import common_pb2, vae_pb2, vae_pb2_grpc


class HalfVae(vae_pb2_grpc.VaeServicer):
    """Info runs into torch's NotImplementedError; Decode is left to the generated base class."""

    async def Info(self, request, context):
        torch.isfinite(torch.zeros(2, dtype=torch.float8_e4m3fn))
        raise AssertionError("unreachable: torch has no isfinite for float8")


@pytest.fixture
async def vae_stub():
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    vae_pb2_grpc.add_VaeServicer_to_server(HalfVae(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield vae_pb2_grpc.VaeStub(channel)
    await server.stop(None)


async def test_only_a_missing_method_is_unimplemented(vae_stub, caplog):
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await vae_stub.Decode(vae_pb2.DecodeRequest(), timeout=10)
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert missing.value.details() == "/fluxmesh.v1.Vae/Decode is not implemented by this server"

    with (
        caplog.at_level(logging.ERROR, logger="fluxmesh.rpc.interceptors"),
        pytest.raises(grpc.aio.AioRpcError) as torch_error,
    ):
        await vae_stub.Info(common_pb2.InfoRequest(), timeout=10)
    assert torch_error.value.code() == grpc.StatusCode.INTERNAL, torch_error.value.details()
    assert "NotImplementedError" in torch_error.value.details()
    [record] = [r for r in caplog.records if "Info failed" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is NotImplementedError  # the traceback is logged


@pytest.mark.parametrize(
    "details,expected",
    [
        ("loras[0].name: no LoRA named 'x'", "denoiser stage: loras[0].name: no LoRA named 'x'"),
        (
            "denoiser stage: weights are released; call fluxmesh.v1.Residency/Load first",
            "denoiser stage: weights are released; call fluxmesh.v1.Residency/Load first",
        ),
    ],
)
def test_the_orchestrator_names_a_stage_once(details, expected):
    from fluxmesh.orchestrator.stages import stage_errors
    from fluxmesh.rpc.errors import FluxmeshError

    with pytest.raises(FluxmeshError) as relayed, stage_errors("denoiser", "127.0.0.1:1"):
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.FAILED_PRECONDITION, grpc.aio.Metadata(), grpc.aio.Metadata(), details
        )
    assert relayed.value.message == expected and relayed.value.code == grpc.StatusCode.FAILED_PRECONDITION


class NotLoadedVae(vae_pb2_grpc.VaeServicer):
    """Decode answers as a released stage does; Encode with the same code and words, no reason."""

    async def Decode(self, request, context):
        from fluxmesh.rpc.errors import NotResident

        raise NotResident("vae stage: weights are released; call fluxmesh.v1.Residency/Load first")

    async def Encode(self, request, context):
        from fluxmesh.rpc.errors import FailedPrecondition

        raise FailedPrecondition("vae stage: weights are released; call fluxmesh.v1.Residency/Load first")


async def test_a_reason_crosses_the_wire_as_a_status_detail_not_as_words():
    from fluxmesh.orchestrator.stages import stage_errors
    from fluxmesh.rpc.errors import NOT_RESIDENT, FluxmeshError

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    vae_pb2_grpc.add_VaeServicer_to_server(NotLoadedVae(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vae_pb2_grpc.VaeStub(channel)
            reasons = {}
            for name, call in (
                ("decode", stub.Decode(vae_pb2.DecodeRequest(), timeout=10)),
                ("encode", stub.Encode(vae_pb2.EncodeImageRequest(), timeout=10)),
            ):
                with pytest.raises(FluxmeshError) as caught:
                    with stage_errors("vae", "here"):
                        await call
                assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
                assert caught.value.message.startswith("vae stage: weights are released")
                reasons[name] = caught.value.reason
    finally:
        await server.stop(None)
    assert reasons == {"decode": NOT_RESIDENT, "encode": ""}


class LeakyVae(vae_pb2_grpc.VaeServicer):
    """A bug whose text holds a server path (as exception text often does)."""

    async def Info(self, request, context):
        raise OSError("cannot read /srv/private/models/vae/diffusion_pytorch_model.safetensors")


async def test_a_server_fault_reaches_only_those_allowed_its_details(caplog):
    """The orchestrator's tenants get a server fault's code and a request id; the text (paths,
    exception, addresses) goes to the log under that id, and the admin still reads it whole."""
    import re

    from fluxmesh.rpc.request_ids import install_log_field

    install_log_field()  # as every fluxmesh server does: log lines name their request id

    def admin(metadata) -> bool:
        return ("authorization", "Bearer admin") in tuple(metadata)

    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor(admin)])
    vae_pb2_grpc.add_VaeServicer_to_server(LeakyVae(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vae_pb2_grpc.VaeStub(channel)
            with caplog.at_level(logging.ERROR, logger="fluxmesh.rpc.interceptors"):
                with pytest.raises(grpc.aio.AioRpcError) as tenant:
                    await stub.Info(common_pb2.InfoRequest(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await stub.Info(common_pb2.InfoRequest(), timeout=10, metadata=(("authorization", "Bearer admin"),))
    finally:
        await server.stop(None)
    assert tenant.value.code() == full.value.code() == grpc.StatusCode.INTERNAL
    quoted = re.fullmatch(r"the server failed; quote request id (\S+) to its operator .*", tenant.value.details())
    assert quoted and "/srv" not in tenant.value.details() and "OSError" not in tenant.value.details(), tenant.value
    record = next(r for r in caplog.records if "Info failed" in r.getMessage())  # the tenant's call
    assert record.request_id == quoted[1] and "/srv/private" in str(record.exc_info[1])
    assert full.value.details() == "OSError: cannot read /srv/private/models/vae/diffusion_pytorch_model.safetensors"
