"""A caller's mistake reaches an SDK user as FluxmeshError with a code and the field named, never
protobuf's ValueError/TypeError, an OSError or a grpc.RpcError (README: one exception type)."""

from __future__ import annotations

import asyncio
import io

import grpc
import pytest
from PIL import Image

from fluxmesh.cli.supervisor import free_port
from fluxmesh.client import AsyncClient, Client, FluxmeshError, Reference

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def dead() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens: only what fails before a call is tested here


@pytest.mark.parametrize(
    "options,says",
    [
        ({"seed": -1}, "seed: -1 is outside [0, 18446744073709551615] (uint64)"),
        ({"width": 2**31}, "width: 2147483648 is outside [-2147483648, 2147483647] (int32)"),
        ({"steps": -(2**31) - 1}, "steps: -2147483649 is outside"),
        ({"priority": 2**63}, "priority: 9223372036854775808 is outside"),
        ({"num_images": "two"}, "num_images: 'two' (str)"),
        ({"guidance": "high"}, "guidance: 'high' (str)"),
        ({"loras": [("ink", "heavy")]}, "loras[0].weight: 'heavy' (str)"),
        ({"loras": [42]}, "loras[0]: 42; expected a name or a (name, weight) pair"),
        ({"loras": "ink"}, "loras: 'ink'; expected a list"),
        ({"preview": "fast", "preview_every": 2**40}, "preview.every: 1099511627776 is outside"),
        ({"init_image": 3.5}, "init_image: a float; expected PNG/JPEG bytes, a path or a PIL image"),
        ({"references": [Reference("redux", _png(), scale="big")]}, "references[0].scale: 'big' (str)"),
        ({"references": ["photo.png"]}, "references[0]: 'photo.png'; expected a Reference"),
        ({"preview": "slow"}, "preview: 'slow'; expected one of"),
    ],
)
def test_option_values_the_wire_cannot_carry_are_invalid_argument_naming_the_field(dead, options, says):
    with Client(dead) as client, pytest.raises(FluxmeshError) as caught:
        client.generate("a fox", **options)
    assert caught.value.code == INVALID and says in caught.value.message, caught.value.message


def test_image_files_that_cannot_be_read_are_invalid_argument_before_any_call(dead, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        "init_image": (tmp_path / "missing.png", "No such file or directory"),
        "mask_image": (tmp_path, "Is a directory"),
    }
    with Client(dead) as client:
        for field, (path, says) in cases.items():
            with pytest.raises(FluxmeshError) as caught:
                client.generate("a fox", **{field: path})
            assert caught.value.code == INVALID and caught.value.message.startswith(f"{field}: cannot read")
            assert says in caught.value.message
        with pytest.raises(FluxmeshError) as caught:
            client.generate("a fox", init_image=str(tmp_path / "notes.txt"))
        assert caught.value.code == INVALID and "not a PNG or JPEG image" in caught.value.message


def test_the_async_client_raises_the_same(dead):
    async def call() -> None:
        async with AsyncClient(dead) as client:
            await client.generate("a fox", seed=-1)

    with pytest.raises(FluxmeshError) as caught:
        asyncio.run(call())
    assert caught.value.code == INVALID and caught.value.message.startswith("seed: -1 is outside")


def test_a_server_that_is_down_is_unavailable_for_every_call(dead):
    with Client(dead) as client:
        for call in (client.info, client.list_loras, lambda: client.generate("a fox", timeout=5)):
            with pytest.raises(FluxmeshError) as caught:
                call()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_valid_values_at_the_edges_of_the_wire_types_still_go_out(dead):
    """The checks refuse only what the wire cannot carry: the largest seed is sent (and the call
    fails only because nothing listens)."""
    with Client(dead) as client, pytest.raises(FluxmeshError) as caught:
        client.generate("a fox", seed=2**64 - 1, width=0, init_image=_png(), loras=["ink", ("ink", 0.5)], timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    "arguments,field",
    [
        ({"address": None}, "address"),
        ({"token": "two\nlines"}, "token"),
        ({"token": 12345}, "token"),
        ({"credentials": "tls"}, "credentials"),
        ({"timeout": "soon"}, "timeout"),
    ],
)
def test_a_client_built_wrong_says_which_argument(dead, arguments, field):
    address = arguments.pop("address", dead)
    for kind in (Client, AsyncClient):
        with pytest.raises(FluxmeshError) as caught:
            kind(address, **arguments)
        assert caught.value.code == INVALID and caught.value.message.startswith(f"{field}: "), caught.value.message


def test_per_call_timeouts_and_cache_of_the_wrong_type_are_named(dead):
    with Client(dead) as client:
        for call, field in (
            (lambda: client.info(timeout="soon"), "timeout"),
            (lambda: client.list_loras(timeout=[1]), "timeout"),
            (lambda: client.generate("a fox", timeout="soon"), "timeout"),
            (lambda: client.generate("a fox", cache=5), "cache"),
        ):
            with pytest.raises(FluxmeshError) as caught:
                call()
            assert caught.value.code == INVALID and caught.value.message.startswith(f"{field}: ")
