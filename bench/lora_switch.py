"""What switching LoRAs costs on a running denoiser, against loading a pipeline with them.

    python bench/lora_switch.py [--repeats 7]

On the `small` tiny model with kohya-named LoRAs (the fixtures the tests use):
  * switch: the denoiser's per-request activation going between two different cached sets
    (a@0.8+b@0.5 <-> c@1.0), which is all a request pays once its LoRAs were read once;
  * load: what a process without fluxmesh pays for a new set: FluxPipeline.from_pretrained +
    load_lora_weights + set_adapters;
  * memory: bytes each cached LoRA holds (converted tensors), and process RSS growth per
    adapter injected into the transformer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import median, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import FluxPipeline
    from diffusers.utils import logging as diffusers_logging

    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.runtime.device import Device
    from lora_fixtures import write_lora

    diffusers_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "small")
        loras = Path(tmp) / "loras"
        for i, name in enumerate("abc"):
            write_lora("kohya", loras / f"{name}.safetensors", folder, seed=i + 1)

        engine = DenoiserEngine(folder, Device.parse("cpu", "float32"), lora_dir=loras)
        set_one, set_two = [("a", 0.8), ("b", 0.5)], [("c", 1.0)]
        rss = [_rss()]
        with torch.inference_mode():
            for lora_set in (set_one, set_two):  # first use: read, convert and inject once
                engine.loras.activate(lora_set)
                rss.append(_rss())
            switches = []
            for i in range(args.repeats * 2):
                started = time.perf_counter()
                engine.loras.activate(set_one if i % 2 else set_two)
                switches.append(time.perf_counter() - started)

        def load_pipeline():
            pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
            for name, _ in set_one:
                pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=name)
            pipe.set_adapters([n for n, _ in set_one], adapter_weights=[w for _, w in set_one])

        loads = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            load_pipeline()
            loads.append(time.perf_counter() - started)

        library = engine.loras.library
        cached = {name: library.load(name).nbytes for name in "abc"}
        weights = engine.weight_bytes()

    switch, load = median(switches), median(loads)
    print(f"small tiny model (transformer {weights / 2**20:.1f} MiB), kohya LoRAs, {args.repeats} runs, medians")
    print(f"switch active set (cached)        {switch * 1000:8.2f} ms")
    print(f"load pipeline + LoRAs + adapters  {load * 1000:8.2f} ms")
    print(f"ratio switch / load: {switch / load:.4f}  ({load / switch:.0f}x faster)")
    for name, nbytes in cached.items():
        print(f"cached LoRA {name}: {nbytes / 2**10:.1f} KiB converted tensors")
    print(
        f"RSS growth for first use of a+b: {(rss[1] - rss[0]) / 2**20:.1f} MiB, then c: {(rss[2] - rss[1]) / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
