"""What live previews cost: denoising with vae previews vs without, and one fast preview.

    python bench/previews.py [--repeats 7] [--width 256 --height 256 --steps 16 --every 4]

1. Denoise stage time (the orchestrator's own Timings.denoise) on the `small` tiny model with
   stages in separate processes: previews off, `vae` previews every N steps, `fast` previews
   every N steps, measured alternately (medians: the machine is noisy). vae previews are decoded
   by the vae process while the denoiser goes on, so the ratio is about whether the two have
   their own compute: each stage gets `--stage-threads` torch threads (default 1, i.e. one core
   each on a 2-core machine; target <= 1.10 where the stages have their own devices).
2. One fast preview at 1024x1024 (latents 128x128x16, packed 4096x64), in process: the x0
   estimate, the projection to RGB, and projection + JPEG encoding (what the denoiser does per
   preview step).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import median, tiny_model

PROMPT = "a red fox in the snow, highly detailed"


def denoise_ratios(args) -> None:
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client, Step

    modes = {
        "off": {},
        "vae": {"preview": "vae", "preview_every": args.every},
        "fast": {"preview": "fast", "preview_every": args.every},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "small")
        flags = ["--threads", str(args.stage_threads)] if args.stage_threads else []
        # --stage-threads 0: torch's default in every stage (not up's division of the cores)
        with (
            start_local(str(folder), port=free_port(), common_args=flags, share_cores=bool(flags)) as cluster,
            Client(cluster.address, timeout=600) as client,
        ):

            def run(options) -> tuple[float, int]:
                previews, result = 0, None
                for event in client.stream(
                    PROMPT, width=args.width, height=args.height, steps=args.steps, guidance=3.5, seed=1, **options
                ):
                    if isinstance(event, Step) and event.previews:
                        previews += 1
                    result = event
                return result.timings.denoise, previews

            for options in modes.values():  # warm every path
                run(options)
            samples = {name: [] for name in modes}
            delivered = {name: [] for name in modes}
            for _ in range(args.repeats):  # alternate so drift on a noisy machine hits all alike
                for name, options in modes.items():
                    seconds, previews = run(options)
                    samples[name].append(seconds)
                    delivered[name].append(previews)
    off = median(samples["off"])
    print(
        f"small tiny model, {args.width}x{args.height}, {args.steps} steps, previews every {args.every}, "
        f"{args.repeats} runs each, stage threads {args.stage_threads or 'default'}, {os.cpu_count()} CPUs"
    )
    for name in modes:
        m = median(samples[name])
        print(
            f"denoise, previews {name:4s}: median {m * 1000:8.1f} ms (min {min(samples[name]) * 1000:.1f}), "
            f"ratio to off {m / off:.3f}, previews delivered per run {median(delivered[name]):.0f}"
        )


def fast_preview_cost(repeats: int) -> None:
    import torch

    from fluxmesh.services.denoiser.previews import fast_previews, project_packed
    from fluxmesh.services.previews.latent_rgb import LatentRgb

    torch.set_num_threads(1)  # as a denoiser sharing a host would run; the work is single-threaded anyway
    rgb = LatentRgb.flux()
    generator = torch.Generator().manual_seed(0)
    sample, velocity = (torch.randn(1, 4096, 64, generator=generator) for _ in range(2))
    sigma = torch.tensor(0.5)
    x0 = sample - sigma * velocity

    def per_call(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return median(times) * 1000

    estimate = per_call(lambda: sample.to(torch.float32) - sigma * velocity)
    project = per_call(lambda: project_packed(x0, 1024, 1024, 8, rgb))
    full = per_call(lambda: fast_previews(x0, 1024, 1024, 8, rgb))
    size = len(fast_previews(x0, 1024, 1024, 8, rgb)[0].data)
    print(f"fast preview at 1024x1024 (packed 4096x64 -> 128x128 RGB), median of {repeats}, 1 torch thread:")
    print(
        f"  x0 estimate {estimate:.3f} ms, projection {project:.3f} ms, projection + JPEG {full:.3f} ms "
        f"({size} bytes); per preview step: {estimate + full:.3f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--stage-threads", type=int, default=1, help="torch threads per stage process (0: torch's)")
    parser.add_argument("--fast-repeats", type=int, default=500)
    parser.add_argument("--skip-denoise", action="store_true", help="only the fast preview cost")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fast_preview_cost(args.fast_repeats)
    if not args.skip_denoise:
        denoise_ratios(args)


if __name__ == "__main__":
    main()
