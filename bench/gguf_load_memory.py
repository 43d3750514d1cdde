"""How much memory loading a GGUF transformer takes, next to the weights it loads.

    python bench/gguf_load_memory.py [--work-dir DIR] [--double 2] [--single 4] [--keep]

A FLUX.1-dev-wide transformer with fewer blocks (--double/--single; FLUX.1-dev has 19/38), its
tiled random weights written with full_size_sequential's `prepare` and quantized to Q8_0, is
loaded in a fresh process per way, side by side, each process's own peak (VmHWM) measured:

* fluxmesh: `load_gguf_transformer` (tensors read into their buffers, `gguf.loading.read_tensors`);
* diffusers: the same call with diffusers' `load_gguf_checkpoint` instead (copies out of a memory
  map of the whole file), what fluxmesh did before.

Printed per way: the load's peak over the process's RSS before it, as a multiple of the loaded
weights, the RSS left after it and the load's seconds (warm page cache: the file was just
written or read). Defaults write ~3.6 GB and hold ~1.3 GiB of weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

GIB = 2**30
CHILD = """
import json, sys, time
from pathlib import Path
from fluxmesh.services.gguf import loading
from fluxmesh.services.runtime.memory import module_bytes, process_memory

way, gguf_file, model = sys.argv[1:4]
if way == "diffusers":
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    loading.read_tensors = lambda path, reader: load_gguf_checkpoint(str(path))
import torch
loading.check_transformer_fits(gguf_file, model)  # imports done before the baseline
before = process_memory().rss
process_memory(reset_peak=True)
started = time.perf_counter()
transformer = loading.load_gguf_transformer(gguf_file, model, compute_dtype=torch.bfloat16)
seconds = time.perf_counter() - started
after = process_memory()
print(json.dumps({"before": before, "peak": after.peak, "after": after.rss, "weights": module_bytes(transformer), "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("flux-gguf-load-memory"))
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--keep", action="store_true", help="keep --work-dir (reused next time)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from full_size_sequential import prepare

    small_t5 = {"num_layers": 1}  # the encoders are not measured here
    configs = {"transformer": {"num_layers": args.double, "num_single_layers": args.single}, "text_encoder_2": small_t5}
    try:
        model, gguf_file = prepare(args.work_dir, configs)
        print(f"\n== loading {gguf_file.name} ({gguf_file.stat().st_size / GIB:.2f} GiB), one fresh process per way ==")
        for way in ("fluxmesh", "diffusers"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, way, str(gguf_file), str(model)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            print(
                f"{way:9s} weights {m['weights'] / GIB:.2f} GiB, load peak {(m['peak'] - m['before']) / GIB:.2f} GiB"
                f" over the {m['before'] / GIB:.2f} GiB before = {(m['peak'] - m['before']) / m['weights']:.2f}x the weights;"
                f" RSS after {m['after'] / GIB:.2f} GiB; {m['seconds']:.1f}s"
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
