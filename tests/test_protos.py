"""The committed generated code is what protoc makes of the committed .proto files."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh():
    done = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_check_notices_a_stale_file(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", copy)
    stale = copy / "fluxmesh" / "v1" / "vae_pb2.py"
    stale.write_text(stale.read_text() + "\n# edited by hand\n")
    done = subprocess.run([sys.executable, str(copy / "generate.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 1 and "vae_pb2.py" in done.stderr
