"""Regenerate the Python gRPC code beside the .proto files.

    python protos/generate.py          # rewrite fluxmesh/v1/*_pb2*.py(i)
    python protos/generate.py --check  # exit 1 if the committed code differs

The generated modules import each other as `fluxmesh.v1.*`, so protoc runs with
`protos/` as the include root.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "fluxmesh" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PACKAGE_DIR.glob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in (out_dir / "fluxmesh" / "v1").iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            target = PACKAGE_DIR / path.name
            if check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(target.name)
            else:
                target.write_bytes(path.read_bytes())
        if check:
            committed = {p.name for p in PACKAGE_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
            stale += sorted(committed - {p.name for p in fresh})
            if stale:
                print("generated code is stale: " + ", ".join(stale), file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
