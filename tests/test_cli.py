"""The `fluxmesh` command as a user runs it: up, generate, health, tiny-model, demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from factories import max_abs_diff, png_image, reference_images
from fluxmesh.cli.supervisor import free_port
from mesh import children_of, exited, wait_for_health, wait_until

FLUXMESH = [sys.executable, "-m", "fluxmesh.cli"]


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FLUXMESH, *args], capture_output=True, text=True, timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.fixture(scope="module")
def up_process(dev_model):
    port = free_port()
    process = subprocess.Popen(
        [*FLUXMESH, "up", "--model", str(dev_model), "--port", str(port), "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_health(f"127.0.0.1:{port}", timeout=180, process=process, output=process.stdout.read)
    yield process, f"127.0.0.1:{port}"
    if process.poll() is None:
        process.kill()


def test_up_then_generate_writes_the_diffusers_image(up_process, dev_model, tmp_path):
    _, address = up_process
    out = tmp_path / "cat.png"
    done = run(
        "generate",
        "--address",
        address,
        "-p",
        "a photo of a cat sitting on a windowsill",
        "--width",
        "64",
        "--height",
        "96",
        "--steps",
        "3",
        "--guidance",
        "3.5",
        "--seed",
        "99",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "seed 99" in done.stderr and "denoise" in done.stderr
    expected = reference_images(dev_model, width=64, height=96, steps=3, guidance=3.5, seed=99)[0]
    assert max_abs_diff(png_image(out.read_bytes()), expected) <= 1


def test_generate_num_images_writes_numbered_files(up_process, tmp_path):
    _, address = up_process
    done = run(
        "generate",
        "--address",
        address,
        "-p",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--num-images",
        "2",
        "-o",
        str(tmp_path / "fox.png"),
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox-0.png", "fox-1.png"]


def test_generate_reports_bad_input_and_exits_nonzero(up_process):
    _, address = up_process
    done = run("generate", "--address", address, "-p", "a fox", "--width", "70")
    assert done.returncode == 2
    assert "INVALID_ARGUMENT: width: 70" in done.stderr
    half = run("generate", "--address", address, "-p", "a fox", "--negative-prompt", "blurry")
    assert half.returncode == 2
    assert "true_cfg_scale: a negative prompt takes effect only with true_cfg_scale > 1" in half.stderr


def test_generate_takes_true_cfg_flags(up_process, tmp_path):
    _, address = up_process
    out = tmp_path / "cfg.png"
    done = run(
        "generate",
        "--address",
        address,
        "-p",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "3",
        "--negative-prompt",
        "blurry",
        "--true-cfg-scale",
        "4",
        "-o",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    plain = tmp_path / "plain.png"
    assert (
        run(
            "generate",
            "--address",
            address,
            "-p",
            "a fox",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            "3",
            "-o",
            str(plain),
        ).returncode
        == 0
    )
    assert max_abs_diff(png_image(out.read_bytes()), png_image(plain.read_bytes())) > 1


def test_health_command(up_process):
    _, address = up_process
    assert run("health", address).stdout.strip() == "SERVING"
    dead = run("health", f"127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert dead.returncode == 1 and dead.stdout.strip() == "UNREACHABLE"


def test_sigterm_stops_up_and_every_child(up_process):
    """Runs last in this module: SIGTERM to `up` leaves no process behind."""
    process, _ = up_process
    children = children_of(process.pid)
    assert len(children) == 4
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    wait_until(lambda: not any(_alive(pid) for pid in children), 10, what="every child gone")


def test_children_die_with_a_killed_parent(dev_model):
    """Even SIGKILL of `up` leaves no orphans (PR_SET_PDEATHSIG)."""
    port = free_port()
    process = subprocess.Popen(
        [*FLUXMESH, "up", "--model", str(dev_model), "--port", str(port), "--threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: len(children_of(process.pid)) >= 4, 180, what="up's four children", alive=exited(process))
    children = children_of(process.pid)
    assert len(children) == 4
    process.kill()
    process.wait()
    wait_until(lambda: not any(_alive(pid) for pid in children), 20, what="every child gone")


def test_a_child_whose_parent_is_already_gone_stops_itself():
    """The parent may die before its child sets PR_SET_PDEATHSIG: the child notices that the
    parent it was given is not its parent and stops (lifeline.py)."""
    from fluxmesh.cli.lifeline import PARENT_PID_ENV

    gone = subprocess.run(
        [*FLUXMESH, "health", "127.0.0.1:9", "--timeout", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, PARENT_PID_ENV: "1"},
    )  # not our parent
    assert gone.returncode == -signal.SIGTERM
    ours = subprocess.run(
        [*FLUXMESH, "health", "127.0.0.1:9", "--timeout", "0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
    )
    assert ours.returncode == 1, ours.stderr  # ran to its end: nothing listens on port 9


def test_tiny_model_is_deterministic(tmp_path):
    import hashlib

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    for name in ("a", "b"):
        assert run("tiny-model", str(tmp_path / name), "--schnell").returncode == 0
    a, b = digest(tmp_path / "a"), digest(tmp_path / "b")
    assert a == b
    assert {
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "scheduler/scheduler_config.json",
    } <= set(a)


def test_demo_runs_all_four_processes_and_writes_a_png(tmp_path):
    out = tmp_path / "demo.png"
    done = run("demo", "-o", str(out), "--width", "64", "--height", "64", "--steps", "2", timeout=300)
    assert done.returncode == 0, done.stderr
    assert png_image(out.read_bytes()).size == (64, 64)
    for stage in ("encoder", "denoiser", "vae", "orchestrator"):
        assert f"{stage} SERVING" in done.stderr
