"""Clients for the three stage services, with errors translated for the public API.

Python gRPC does not carry deadlines or cancellation to outgoing calls by itself: every call
here takes the time left on the incoming call, and the streaming call is cancelled explicitly
when the caller goes away. A stage may be several replicas (comma-separated addresses or a
dns:/// name): replicas.py picks one per call and says which failed calls another may take.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import contextmanager

import grpc

from fluxmesh.contract import Stage
from fluxmesh.orchestrator.deadlines import Deadline
from fluxmesh.orchestrator.replicas import ReplicaSet, channel_options
from fluxmesh.rpc.channels import aio_channel
from fluxmesh.rpc.errors import StageFailed, StageUnavailable, reason_of
from fluxmesh.rpc.request_ids import outgoing_metadata
from fluxmesh.rpc.security import ClientSecurity, is_loopback
from fluxmesh.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)

log = logging.getLogger(__name__)

# A stage refusing the orchestrator's own credential is the operator's to fix, never the
# caller's: the caller hears that the stage is unavailable, the log says why.
CREDENTIAL_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@contextmanager
def stage_errors(stage: str, address: str):
    """Re-raise a stage's failure as a fluxmesh error that names the stage."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise StageUnavailable(stage, f"{address}: {error.details()}") from None
        if error.code() in CREDENTIAL_REFUSALS:
            log.error(
                "%s stage at %s refused the orchestrator (%s: %s): check --stage-token-*/--stage-tls-*",
                stage,
                address,
                error.code().name,
                error.details(),
            )
            raise StageUnavailable(stage, "it refuses this orchestrator's stage credential") from None
        details = error.details() or ""
        # Named once: a stage's own messages may already start with its name ("denoiser
        # stage: weights are released ...").
        named = details if details.startswith(f"{stage} stage") else f"{stage} stage: {details}"
        raise StageFailed(stage, named, code=error.code(), reason=reason_of(error)) from None


class StageClient:
    """One stage: a single server, several replicas (comma-separated) or a dns:/// target
    (see replicas.py for how calls are spread, failed over and retried)."""

    stage: Stage
    stub_class: type = object

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        security: ClientSecurity | None = None,
    ):
        self.address = address
        security = security or ClientSecurity()
        if security.token and credentials is None and not security.uses_tls and not is_loopback(address):
            # Refused outright in the SDK; here a private network (compose, a cluster) is usual, so
            # the operator is told rather than stopped.
            log.warning(
                "the stage token goes to the %s stage at %s over plaintext: anyone on that network "
                "can read it; use --stage-tls-ca",
                self.stage,
                address,
            )

        def connect(target: str) -> grpc.aio.Channel:
            # Every call carries the stage token (if any) and the current request id as metadata.
            return aio_channel(
                target,
                credentials=credentials or security.credentials(),
                interceptors=outgoing_metadata(security.metadata()),
                options=[*security.channel_options(), *channel_options(target)],
            )

        self.replicas = ReplicaSet.connect(self.stage, address, connect, self.stub_class)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The first replica's channel (the only one for a single address)."""
        return self.replicas.replicas[0].channel

    async def info(self, timeout: float | None = 5.0) -> common_pb2.StageInfo:
        return await self._unary("Info", common_pb2.InfoRequest(), timeout, retry=True)

    async def _unary(self, method: str, request, timeout: float | None, *, retry: bool):
        """Call `method` on a replica; on UNAVAILABLE try the others when `retry` allows."""
        deadline, tried = Deadline(timeout), []
        while True:
            replica = self.replicas.pick(tried)
            try:
                with self.replicas.using(replica):
                    return await getattr(replica.stub, method)(request, timeout=deadline.left())
            except grpc.aio.AioRpcError as error:
                tried.append(replica)
                if (
                    self.replicas.failed(replica, error)
                    and retry
                    and self.replicas.can_retry(tried)
                    and not deadline.expired()
                ):
                    continue
                with stage_errors(self.stage, replica.target):
                    raise

    async def close(self) -> None:
        await self.replicas.close()


class EncoderClient(StageClient):
    stage = Stage.encoder
    stub_class = encoder_pb2_grpc.TextEncoderStub

    async def encode(self, request: encoder_pb2.EncodeRequest, timeout: float | None) -> encoder_pb2.EncodeResponse:
        return await self._unary("Encode", request, timeout, retry=True)


class DenoiserClient(StageClient):
    stage = Stage.denoiser
    stub_class = denoiser_pb2_grpc.DenoiserStub

    async def denoise(
        self, request: denoiser_pb2.DenoiseRequest, timeout: float | None
    ) -> AsyncIterator[denoiser_pb2.DenoiseEvent]:
        deadline, tried = Deadline(timeout), []
        while True:
            replica = self.replicas.pick(tried)
            call = replica.stub.Denoise(request, timeout=deadline.left())
            started = finished = False
            try:
                with self.replicas.using(replica):
                    async for event in call:
                        started = True
                        finished = event.HasField("latents")
                        yield event
                return
            except grpc.aio.AioRpcError as error:
                tried.append(replica)
                self.replicas.failed(replica, error)
                if finished:  # the latents arrived; only the closing status was lost with the replica
                    return
                # Re-run elsewhere only what never started here (see replicas.py).
                if (
                    error.code() == grpc.StatusCode.UNAVAILABLE
                    and not started
                    and self.replicas.can_retry(tried)
                    and not deadline.expired()
                ):
                    continue
                with stage_errors(self.stage, replica.target):
                    raise
            finally:
                call.cancel()  # no-op when finished; stops the denoiser when our caller left

    async def list_loras(self, timeout: float | None) -> common_pb2.ListLorasResponse:
        return await self._unary("ListLoras", common_pb2.ListLorasRequest(), timeout, retry=True)


class VaeClient(StageClient):
    stage = Stage.vae
    stub_class = vae_pb2_grpc.VaeStub

    async def decode(self, request: vae_pb2.DecodeRequest, timeout: float | None) -> vae_pb2.DecodeResponse:
        return await self._unary("Decode", request, timeout, retry=True)

    async def encode_image(
        self, request: vae_pb2.EncodeImageRequest, timeout: float | None
    ) -> vae_pb2.EncodeImageResponse:
        return await self._unary("Encode", request, timeout, retry=True)


class Stages:
    """The three stage clients the orchestrator drives."""

    def __init__(self, encoder: EncoderClient, denoiser: DenoiserClient, vae: VaeClient):
        self.encoder, self.denoiser, self.vae = encoder, denoiser, vae

    def all(self) -> tuple[EncoderClient, DenoiserClient, VaeClient]:
        return (self.encoder, self.denoiser, self.vae)
