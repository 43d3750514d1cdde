"""What every fluxmesh server offers tools nobody here wrote: server reflection under both names
(v1 and v1alpha), grpc.health.v1 Check and List, and a loud warning when it listens beyond
loopback without demanding a credential. In process, on stand-in services: under a second."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from fluxmesh.rpc.security import ServerSecurity
from fluxmesh.rpc.server import Server, Service
from fluxmesh.v1 import vae_pb2_grpc

VAE = "fluxmesh.v1.Vae"


async def _server(address: str = "127.0.0.1:0", security: ServerSecurity | None = None) -> Server:
    server = Server(
        [Service(VAE, vae_pb2_grpc.VaeServicer(), vae_pb2_grpc.add_VaeServicer_to_server)],
        address=address,
        security=security,
    )
    await server.start()
    return server


async def _list_services(channel: grpc.aio.Channel, version: str) -> list[str]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    stream = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    replies = [reply async for reply in stream]
    return [service.name for service in replies[0].list_services_response.service]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_under_both_names(version):
    server = await _server()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            names = await _list_services(channel, version)
            # a v1 client can go on to ask for a service's file (what grpcurl describe does)
            call = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=VAE)
            [reply] = [r async for r in call(iter([request]), timeout=10)]
    finally:
        await server.stop(0)
    assert {
        VAE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(names)
    assert reply.file_descriptor_response.file_descriptor_proto, reply


async def test_health_list_names_every_service():
    server = await _server()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await server.set_serving(False, VAE)
            listed = await stub.List(health_pb2.HealthListRequest(), timeout=10)
    finally:
        await server.stop(0)
    assert {name: reply.status for name, reply in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        VAE: health_pb2.HealthCheckResponse.NOT_SERVING,
    }


@pytest.mark.parametrize(
    "address,security,warned",
    [
        ("0.0.0.0:0", ServerSecurity(), True),
        ("[::]:0", ServerSecurity(), True),
        ("0.0.0.0:0", ServerSecurity(tokens=("t",)), False),
        ("127.0.0.1:0", ServerSecurity(), False),
        ("localhost:0", ServerSecurity(), False),
    ],
)
async def test_listening_beyond_loopback_without_credentials_is_loud(caplog, address, security, warned):
    caplog.set_level(logging.WARNING, logger="fluxmesh.rpc.server")
    server = await _server(address, security)
    await server.stop(0)
    warnings = [r.getMessage() for r in caplog.records if "UNPROTECTED" in r.getMessage()]
    assert bool(warnings) == warned, warnings
    if warned:
        assert address in warnings[0] and "--token-file" in warnings[0]
