"""End-to-end latency of the split pipeline vs in-process diffusers.FluxPipeline.

    python bench/latency.py [--repeats 7] [--width 256 --height 256 --steps 8]

Both run on the `small` tiny model, same prompt/size/steps/seed, measured alternately in one
run (the machine is noisy: medians). The split side is the full path a user takes: SDK ->
orchestrator -> encoder -> denoiser (streamed steps) -> vae -> PNG -> SDK, four processes on
loopback. Target: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import median, tiny_model

PROMPT = "a red fox in the snow, highly detailed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import time

    import torch
    from diffusers import FluxPipeline

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "small")
        pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)

        def in_process():
            pipe(
                PROMPT,
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(1),
            ).images[0]

        # Stages run one after another for a single request, so each may use every core, as the
        # in-process pipeline does (not `fluxmesh up`'s default, which divides them for load).
        with (
            start_local(str(folder), port=free_port(), share_cores=False) as cluster,
            Client(cluster.address) as client,
        ):

            def split():
                client.generate(PROMPT, width=args.width, height=args.height, steps=args.steps, guidance=3.5, seed=1)

            for fn in (in_process, split):  # warm both
                fn()
            local, remote = [], []
            for _ in range(args.repeats):  # alternate so drift on a noisy machine hits both alike
                for fn, samples in ((in_process, local), (split, remote)):
                    started = time.perf_counter()
                    fn()
                    samples.append(time.perf_counter() - started)

    a, b = median(local), median(remote)
    print(
        f"small tiny model, {args.width}x{args.height}, {args.steps} steps, {args.repeats} runs each, torch threads {torch.get_num_threads()}"
    )
    print(f"in-process FluxPipeline  median {a * 1000:8.1f} ms  (min {min(local) * 1000:.1f})")
    print(f"split pipeline (4 procs) median {b * 1000:8.1f} ms  (min {min(remote) * 1000:.1f})")
    print(f"ratio split / in-process: {b / a:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
