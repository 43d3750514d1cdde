"""The SDK: typed events in order, sync and asyncio clients, cancellation, and no torch needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import grpc
import pytest

from factories import PROMPT, max_abs_diff
from fluxmesh.client import AsyncClient, Client, FluxmeshError, Result, Stage, StageFinished, StageStarted, Step
from mesh import wait_settled


def test_stream_yields_stages_steps_and_result_in_order(dev_cluster):
    with Client(dev_cluster.address, timeout=60) as client:
        events = list(client.stream(PROMPT, width=64, height=64, steps=3, seed=11))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] in ("Queued", "StageStarted")
    stages = [(type(e).__name__, e.stage) for e in events if isinstance(e, (StageStarted, StageFinished))]
    assert stages == [
        ("StageStarted", Stage.encode),
        ("StageFinished", Stage.encode),
        ("StageStarted", Stage.denoise),
        ("StageFinished", Stage.denoise),
        ("StageStarted", Stage.decode),
        ("StageFinished", Stage.decode),
    ]
    assert [(e.step, e.total) for e in events if isinstance(e, Step)] == [(1, 3), (2, 3), (3, 3)]
    result = events[-1]
    assert isinstance(result, Result) and result.seed == 11
    assert result.timings.total >= result.timings.denoise > 0
    assert len({e.request_id for e in events}) == 1


async def test_async_client_matches_sync_client(dev_cluster):
    async with AsyncClient(dev_cluster.address, timeout=60) as client:
        got = await client.generate(PROMPT, width=64, height=64, steps=2, seed=21)
    with Client(dev_cluster.address, timeout=60) as client:
        want = client.generate(PROMPT, width=64, height=64, steps=2, seed=21)
    assert max_abs_diff(got.image, want.image) == 0


async def test_async_errors_are_fluxmesh_errors(dev_cluster):
    async with AsyncClient(dev_cluster.address) as client:
        with pytest.raises(FluxmeshError) as caught:
            await client.generate(PROMPT, width=63)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _steps_run(client: Client) -> int:
    return next(int(s.details["steps_run"]) for s in client.info().stages if s.stage == "denoiser")


def test_cancel_stops_the_denoiser_within_a_step(dev_cluster):
    steps = 100
    with Client(dev_cluster.address, timeout=120) as client:
        before = _steps_run(client)
        # 768² makes a tiny-model step (~60 ms) outlast the cancel's trip through the orchestrator;
        # at 256² (~10 ms a step) a busy host let three more steps start while it travelled
        stream = client.stream(PROMPT, width=768, height=768, steps=steps, seed=1)
        seen = 0
        with pytest.raises(FluxmeshError) as caught:
            for event in stream:
                if isinstance(event, Step):
                    seen = event.step
                    stream.cancel()
        assert caught.value.code == grpc.StatusCode.CANCELLED
        # the steps seen, the one running when the cancel arrived, and at most one the cancel
        # overtook in flight: far short of 100
        ran = wait_settled(lambda: _steps_run(client), what="the denoiser after the cancel") - before
        assert 1 <= ran <= seen + 2, (ran, seen)
        # and the stage is free again
        assert client.generate(PROMPT, width=64, height=64, steps=1, seed=2).image.size == (64, 64)


def test_sdk_works_without_torch(dev_cluster, tmp_path):
    """fluxmesh.client and the orchestrator import and run with every torch import blocked."""
    script = textwrap.dedent(f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith(("torch.", "diffusers", "transformers")):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, BlockTorch())
        from fluxmesh.client import Client
        import fluxmesh.orchestrator.app, fluxmesh.cli.main
        with Client({dev_cluster.address!r}, timeout=60) as client:
            result = client.generate("a cat", width=64, height=64, steps=1, seed=1)
        result.image.save({str(tmp_path / "out.png")!r})
        assert "torch" not in sys.modules
        print("ok", result.seed)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok 1"
    assert (tmp_path / "out.png").stat().st_size > 0


def test_prompt_truncation_is_reported_not_silent(dev_cluster):
    long_prompt = " ".join(["a red fox in the snow"] * 40)  # far beyond 16 T5 tokens
    with Client(dev_cluster.address, timeout=60) as client:
        cut = client.generate(long_prompt, width=64, height=64, steps=1, seed=1, max_sequence_length=16)
        whole = client.generate("a red fox", width=64, height=64, steps=1, seed=1, max_sequence_length=16)
    assert len(cut.warnings) == 1 and "truncated" in cut.warnings[0] and "16" in cut.warnings[0]
    assert whole.warnings == []


def test_generate_options_are_the_keyword_parameters_of_every_generate_method():
    """One GenerateOptions: its fields are what generate/stream (sync and async) take, by keyword,
    so a misspelt option fails at the call, before any request is sent."""
    import dataclasses
    import inspect

    from fluxmesh.client import GenerateOptions, GeneratorInfo, StageInfo

    fields = [field.name for field in dataclasses.fields(GenerateOptions)]
    assert fields[0] == "prompt" and {"steps", "seed", "preview", "timeout"} <= set(fields)
    for method in (Client.generate, Client.stream, AsyncClient.generate, AsyncClient.stream):
        parameters = list(inspect.signature(method).parameters.values())
        assert [p.name for p in parameters] == ["self", *fields], method
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters[2:]), method
        assert "steps:" in method.__doc__
    assert inspect.iscoroutinefunction(AsyncClient.generate)
    assert inspect.signature(Client.info).return_annotation in (GeneratorInfo, "GeneratorInfo")
    assert "details" in {field.name for field in dataclasses.fields(StageInfo)}
    with Client("localhost:1") as client:
        with pytest.raises(TypeError, match="stepz"):
            client.generate(PROMPT, stepz=2)
        with pytest.raises(TypeError):
            client.generate(PROMPT, 64)  # options are keywords only
        with pytest.raises(ValueError, match="preview: 'slow'"):
            client.stream(PROMPT, preview="slow")


def test_info_is_typed(dev_cluster):
    from fluxmesh.client import GeneratorInfo

    with Client(dev_cluster.address, timeout=60) as client:
        info = client.info()
    assert isinstance(info, GeneratorInfo) and info.size_multiple == 16 and info.guidance_embeds
    assert [stage.stage for stage in info.stages] == ["encoder", "denoiser", "vae"]
    assert all(stage.weight_bytes > 0 and isinstance(stage.details, dict) for stage in info.stages)
