"""Careless input to the `fluxmesh` command: one line saying what is wrong, a non-zero exit, never
a traceback, and nothing started. In process (typer's runner) where nothing would run anyway."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fluxmesh.cli.main import app


@pytest.fixture
def nothing_starts(monkeypatch):
    """Record what would have been served instead of serving it."""
    import fluxmesh.orchestrator.app as orchestrator_app
    import fluxmesh.services.app as stage_app

    started = []
    monkeypatch.setattr(orchestrator_app, "serve_orchestrator", started.append)
    monkeypatch.setattr(stage_app, "serve_stage", started.append)
    return started


def _refused(argv: list[str]) -> str:
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2, (argv, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize(
    "flag,value,says",
    [
        ("--max-active", "0", "--max-active 0: must be at least 1"),
        ("--max-active", "-1", "--max-active -1: must be at least 1"),
        ("--max-queue", "-1", "--max-queue -1: must be at least 0"),
        ("--request-timeout", "-5", "--request-timeout -5: must be above 0"),
        ("--max-request-mib", "0", "--max-request-mib 0: must be at least 1"),
        ("--max-request-mib", "-3", "--max-request-mib -3: must be at least 1"),
    ],
)
def test_orchestrator_limits_out_of_range_are_refused_in_one_line(nothing_starts, flag, value, says):
    assert says in _refused(["serve", "orchestrator", flag, value])
    assert nothing_starts == []


def test_orchestrator_limits_at_their_edges_are_taken(nothing_starts):
    result = CliRunner().invoke(
        app, ["serve", "orchestrator", "--max-active", "1", "--max-queue", "0", "--request-timeout", "0"]
    )
    assert result.exit_code == 0, result.output
    (options,) = nothing_starts
    assert (options.max_active, options.max_queue, options.request_timeout) == (1, 0, None)


def test_stage_threads_out_of_range_are_refused_in_one_line(nothing_starts):
    assert "--threads 0: must be at least 1" in _refused(["serve", "vae", "--model", "m", "--threads", "0"])
    assert nothing_starts == []
