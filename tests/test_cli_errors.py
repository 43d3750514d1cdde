"""Bad input to the `fluxmesh` command, run as a user runs it (a subprocess): one line on stderr
saying what is wrong, a non-zero exit, never a traceback. (Flags refused before anything starts,
in process: tests/test_cli_input.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from factories import png_image
from fluxmesh.cli.supervisor import free_port

FLUXMESH = [sys.executable, "-m", "fluxmesh.cli"]
NOWHERE = "127.0.0.1:9"  # nothing listens: calls that get that far fail UNAVAILABLE


def refused(*args: str, code: int = 2, timeout: float = 120) -> str:
    """Run `fluxmesh ARGS`; assert the exit code and exactly one line on stderr; return it."""
    done = subprocess.run([*FLUXMESH, *args], capture_output=True, text=True, timeout=timeout)
    lines = done.stderr.splitlines()
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code and len(lines) == 1, (done.returncode, done.stderr)
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return {
        "missing": folder / "missing.png",
        "folder": folder,
        "text": folder / "notes.txt",
        "cut": folder / "cut.png",
    }


@pytest.mark.parametrize(
    "flags,says",
    [
        (["--seed", "-1"], "seed: -1 is outside [0, 18446744073709551615] (uint64)"),
        (["--seed", str(2**64)], f"seed: {2**64} is outside [0, 18446744073709551615] (uint64)"),
        (["--width", str(2**31)], f"width: {2**31} is outside [-2147483648, 2147483647] (int32)"),
        (["--preview", "fast", "--preview-every", str(2**33)], "preview.every: 8589934592 is outside"),
    ],
)
def test_numbers_beyond_the_wire_types_are_named_before_any_call(flags, says):
    line = refused("generate", "-p", "a fox", "--address", NOWHERE, *flags)
    assert line.startswith(f"error: INVALID_ARGUMENT: {says}"), line


@pytest.mark.parametrize(
    "flag,kind,says",
    [
        ("--init-image", "missing", "init_image: cannot read '{path}': No such file or directory"),
        ("--init-image", "folder", "init_image: cannot read '{path}': Is a directory"),
        ("--init-image", "text", "init_image ({path}): not a PNG or JPEG image"),
        ("--init-image", "cut", "init_image ({path}): "),
        ("--mask", "missing", "mask_image: cannot read '{path}': No such file or directory"),
        ("--reference", "text", "references[0].image ({path}): not a PNG or JPEG image"),
        ("--control", "missing", "references[0].image: cannot read '{path}'"),
    ],
)
def test_image_files_that_cannot_be_used_are_named_before_any_call(files, flag, kind, says):
    path = files[kind]
    line = refused("generate", "-p", "a fox", "--address", NOWHERE, flag, str(path))
    assert line.startswith(f"error: INVALID_ARGUMENT: {says.format(path=path)}"), line


@pytest.mark.parametrize("command", ["info", "loras", "generate"])
def test_calls_to_a_server_that_is_down_are_one_line(command):
    args = [command, "--address", f"127.0.0.1:{free_port()}"] + (["-p", "a fox"] if command == "generate" else [])
    assert refused(*args).startswith("error: UNAVAILABLE: ")


def test_an_image_that_cannot_be_written_where_asked_is_written_elsewhere_and_said_so(dev_cluster, tmp_path):
    """The image was made: it is not thrown away because -o is a path nobody can write (here, under
    a file; root may write anywhere else), but written to the temp folder, and stdout names it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    asked = blocker / "fox.png"
    done = subprocess.run(
        [*FLUXMESH, "generate", "-p", "a fox", "--address", dev_cluster.address]
        + ["--width", "64", "--height", "64", "--steps", "1", "--seed", "3", "-o", str(asked)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (said,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    written = Path(done.stdout.strip())
    assert said.startswith(f"error: cannot write {asked} (") and said.endswith(f"); the image is in {written}")
    assert written.name.startswith("fox-") and written.suffix == ".png" and written.parent != blocker.parent
    assert png_image(written.read_bytes()).size == (64, 64)
    written.unlink()


def test_serve_with_a_gguf_of_another_model_is_one_line(dev_model, schnell_model, tmp_path):
    """(A file that is not a GGUF at all: tests/test_community_files.py.)"""
    from fluxmesh.services.gguf import quantize_transformer

    other = quantize_transformer(schnell_model, tmp_path / "schnell.gguf", "Q8_0")
    args = [
        "serve",
        "denoiser",
        "--model",
        str(dev_model),
        "--port",
        str(free_port()),
        "--transformer-gguf",
        str(other),
    ]
    done = subprocess.run([*FLUXMESH, *args], capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if " INFO " not in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1 and errors[0].startswith("error: ") and "transformer" in errors[0], errors


@pytest.mark.parametrize("command", ["up", "serve denoiser"])
def test_a_missing_lora_dir_is_one_line(dev_model, tmp_path, command):
    line = refused(*command.split(), "--model", str(dev_model), "--port", "0", "--lora-dir", str(tmp_path / "none"))
    assert "does not exist" in line or "no such directory" in line, line
    assert str(tmp_path / "none") in line


def test_up_names_a_model_that_is_not_there_and_starts_nothing(tmp_path):
    line = refused("up", "--model", str(tmp_path / "none"), "--port", "0")
    assert line == f"error: NOT_FOUND: model '{tmp_path / 'none'}': no such folder (and not a Hub id like " + (
        "black-forest-labs/FLUX.1-dev)"
    )


def test_up_with_a_missing_gguf_is_one_line(dev_model, tmp_path):
    line = refused("up", "--model", str(dev_model), "--port", "0", "--transformer-gguf", str(tmp_path / "x.gguf"))
    assert line == f"error: --transformer-gguf {tmp_path / 'x.gguf'}: no such file"
