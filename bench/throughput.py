"""Throughput under concurrent load: images/s and latency with 1, 4 and 8 clients.

    python bench/throughput.py [--sections serving,batch-cost,prompt-cache,step-cache,cores] [--rounds 3]
                               [--width 256 --height 256 --steps 8] [--max-batch 2,4]

Everything runs on the `small` tiny model through the real four processes on loopback (SDK ->
orchestrator -> encoder -> denoiser -> vae), measured side by side in one run, rounds
alternating between the configurations so drift on a noisy machine hits them alike; figures
are medians over rounds, each with the median 1-minute load average it was measured under.

Sections:
  serving       images/s and p50/p99 latency with 1, 4 and 8 concurrent clients for the serial
                denoiser (--max-batch 1), continuous batching (each --max-batch), batching with
                --compile on the denoiser and the vae, and in-process FluxPipeline called
                serially (one client: it serves one at a time) on the denoiser's share of threads;
                at 8 clients also where the cores went: each process's CPU seconds per image.
  batch-cost    one forward of the transformer at batch 1, 2, 4, 8 (T5 length 512 and 256),
                eager and compiled as --compile compiles it: seconds per image, in-process
                (what --max-batch's default is chosen from); and, from torch's profiler, how
                much of a forward is attention and matrix products (what compile cannot fuse).
  prompt-cache  sequential mode: a burst of 4 requests of one prompt, then 4 more of it, with
                --prompt-cache-mib 0 and with the cache: swaps per request, encoder calls.
  step-cache    denoise time and attention blocks skipped per step-cache policy (first-block,
                mag, taylorseer) against none, through the four processes.
  cores         `fluxmesh up`'s CPU threads: torch's default in every stage (all cores each),
                the cores divided 1 : 2 : 1 between the stages (the rule before) and up's
                shares (fluxmesh.rpc.cores): 8 requests one after another vs 8 at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from _common import timed, tiny_model

if TYPE_CHECKING:
    from fluxmesh.cli.supervisor import Cluster

PROMPT = "a red fox in the snow, highly detailed"


@dataclass
class Load:
    """One burst: `requests` generations from `clients` concurrent clients."""

    clients: int
    requests: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)
    load_average: float = 0.0  # the host's 1-minute load average when the burst ended
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per process, when measured

    def cores_busy(self, cores: int) -> float:
        """The share of `cores` the burst kept busy (1.0: all of them, all the time)."""
        return sum(self.cpu_seconds.values()) / self.wall / cores

    @property
    def images_per_second(self) -> float:
        return self.requests / self.wall

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    """User + system CPU seconds used so far by each of the cluster's processes, and by this one
    (the bench's clients, decoding the images) as "clients"."""
    import psutil

    used = {str(child.name): sum(psutil.Process(child.process.pid).cpu_times()[:2]) for child in cluster.children}
    used["clients"] = sum(psutil.Process().cpu_times()[:2])
    return used


def burst(
    address: str, clients: int, requests: int, args, prompts=None, cluster: Cluster | None = None, **options
) -> Load:
    """Send `requests` generations from `clients` threads, each as soon as its previous one is done;
    with `cluster`, also count the CPU seconds its processes (and the clients) spent on them."""
    from fluxmesh.client import Client

    load = Load(clients, requests)
    issued = iter(range(requests))
    lock = threading.Lock()

    def client_loop(client) -> None:
        while True:
            with lock:
                index = next(issued, None)
            if index is None:
                return
            prompt = prompts[index % len(prompts)] if prompts else PROMPT
            started = time.perf_counter()
            client.generate(prompt, width=args.width, height=args.height, steps=args.steps, seed=index, **options)
            with lock:
                load.latencies.append(time.perf_counter() - started)

    sdk = [Client(address, timeout=600) for _ in range(clients)]
    try:
        threads = [threading.Thread(target=client_loop, args=(c,)) for c in sdk]
        before = cpu_seconds(cluster) if cluster else {}
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load.wall = time.perf_counter() - started
        load.load_average = os.getloadavg()[0]
        if cluster:
            load.cpu_seconds = {name: used - before[name] for name, used in cpu_seconds(cluster).items()}
    finally:
        for client in sdk:
            client.close()
    return load


def section_cores(folder: Path, args) -> None:
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.rpc.cores import cpu_shares, host_cores

    cores = host_cores()
    divided = {"encoder": max(1, cores // 4), "denoiser": max(1, cores // 2)}  # 1 : 2 : 1, the rule before
    divided["vae"] = max(1, cores - divided["encoder"] - divided["denoiser"])
    configs: dict[str, tuple[bool, dict[str, list[str]] | None]] = {
        "torch default (all cores per stage)": (False, None),
        f"divided {'/'.join(map(str, divided.values()))} (the rule before)": (
            False,
            {stage: ["--threads", str(n)] for stage, n in divided.items()},
        ),
        f"up's shares {'/'.join(map(str, cpu_shares(cores).values()))}": (True, None),
    }
    results: dict[str, dict[str, list[float]]] = {name: {"serial": [], "concurrent": []} for name in configs}
    clusters = {
        name: start_local(str(folder), port=free_port(), share_cores=share, stage_args=flags)
        for name, (share, flags) in configs.items()
    }
    try:
        for cluster in clusters.values():  # warm each
            burst(cluster.address, 1, 2, args)
        for _ in range(args.rounds):
            for name, cluster in clusters.items():
                results[name]["serial"].append(burst(cluster.address, 1, 8, args).images_per_second)
                results[name]["concurrent"].append(burst(cluster.address, 8, 8, args).images_per_second)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    print(
        f"== cores: 8 requests serial vs 8 at once, {args.width}x{args.height}, {args.steps} steps, "
        f"{host_cores()} cores, median of {args.rounds} rounds"
    )
    for name, figures in results.items():
        serial, concurrent = statistics.median(figures["serial"]), statistics.median(figures["concurrent"])
        print(
            f"  {name:36s} serial {serial:6.2f} img/s   8 at once {concurrent:6.2f} img/s   "
            f"concurrent/serial {concurrent / serial:.2f}"
        )


def section_serving(folder: Path, args) -> None:
    import torch
    from diffusers import FluxPipeline

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.rpc.cores import cpu_shares, host_cores

    compiled = ["--compile", "--warmup-sizes", f"{args.width}x{args.height}"]
    configs: dict[str, dict[str, list[str]]] = {"serial denoiser (--max-batch 1)": {"denoiser": ["--max-batch", "1"]}}
    for size in args.max_batch:
        configs[f"batching (--max-batch {size})"] = {"denoiser": ["--max-batch", str(size)]}
        configs[f"batching + compile (--max-batch {size})"] = {
            "denoiser": ["--max-batch", str(size), *compiled],
            "vae": compiled,
        }
    loads = {1: 8, 4: 8, 8: 8}  # clients: requests per burst
    figures: dict[str, dict[int, list[Load]]] = {name: {c: [] for c in loads} for name in configs}
    started = time.perf_counter()
    clusters = {
        name: start_local(str(folder), port=free_port(), stage_args=flags, timeout=3600)
        for name, flags in configs.items()
    }
    print(f"  (clusters SERVING after {time.perf_counter() - started:.0f} s, compile warm-up included)")
    # In-process FluxPipeline on the threads `fluxmesh up` gives the denoiser stage: with all
    # cores it fights the idle stages' and the host's other load, and measures that instead.
    threads = cpu_shares(host_cores())["denoiser"]
    torch.set_num_threads(threads)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    in_process: list[tuple[float, float]] = []  # (seconds, load average)

    def local(seed: int) -> None:
        with torch.inference_mode():
            pipe(
                PROMPT,
                width=args.width,
                height=args.height,
                num_inference_steps=args.steps,
                guidance_scale=3.5,
                generator=torch.Generator("cpu").manual_seed(seed),
            )

    try:
        for cluster in clusters.values():
            burst(cluster.address, 2, 2, args)  # warm
        local(0)
        for _ in range(args.rounds):
            for name, cluster in clusters.items():
                for clients, requests in loads.items():
                    counted = cluster if clients == 8 else None
                    figures[name][clients].append(burst(cluster.address, clients, requests, args, cluster=counted))
            for seed in range(4):
                begun = time.perf_counter()
                local(seed)
                in_process.append((time.perf_counter() - begun, os.getloadavg()[0]))
    finally:
        for cluster in clusters.values():
            cluster.stop()
    print(
        f"== serving: small tiny model, {args.width}x{args.height}, {args.steps} steps, four processes as "
        f"`fluxmesh up` starts them, {host_cores()} cores, median of {args.rounds} rounds"
    )
    print(f"  {'configuration':40s} {'clients':>7s} {'images/s':>9s} {'p50 s':>7s} {'p99 s':>7s} {'load':>5s}")
    for name, by_clients in figures.items():
        for clients, rounds in by_clients.items():
            print(
                f"  {name:40s} {clients:7d} {statistics.median(r.images_per_second for r in rounds):9.2f} "
                f"{statistics.median(r.percentile(0.5) for r in rounds):7.2f} "
                f"{statistics.median(r.percentile(0.99) for r in rounds):7.2f} "
                f"{statistics.median(r.load_average for r in rounds):5.1f}"
            )
    seconds = [t for t, _ in in_process]
    label = f"in-process FluxPipeline, serially ({threads} thr)"
    print(
        f"  {label:40s} {1:7d} {1 / statistics.median(seconds):9.2f} {statistics.median(seconds):7.2f} "
        f"{max(seconds):7.2f} {statistics.median(la for _, la in in_process):5.1f}"
    )

    def at(name: str, clients: int, figure: Callable[[Load], float]) -> float:
        return statistics.median(figure(r) for r in figures[name][clients])

    # With every core busy, images/s can only grow by as much as the CPU seconds an image costs
    # shrink: this table is where the 8-client ratios below come from.
    print(f"  at 8 clients, CPU seconds per image (user + system) and the share of the {host_cores()} cores kept busy:")
    for name, by_clients in figures.items():
        rounds = by_clients[8]
        per_image = {
            process: statistics.median(r.cpu_seconds[process] / r.requests for r in rounds)
            for process in rounds[0].cpu_seconds
        }
        print(
            f"  {name:40s} "
            + "  ".join(f"{process} {seconds:.3f}" for process, seconds in per_image.items())
            + f"  total {sum(per_image.values()):.3f}  cores busy {statistics.median(r.cores_busy(host_cores()) for r in rounds):.0%}"
        )
    serial, *batched = configs
    for name in batched:
        print(
            f"  8 clients, {name} / serial denoiser: images/s "
            f"{at(name, 8, lambda r: r.images_per_second) / at(serial, 8, lambda r: r.images_per_second):.2f}x, "
            f"p50 {at(name, 8, lambda r: r.percentile(0.5)):.2f}s vs {at(serial, 8, lambda r: r.percentile(0.5)):.2f}s; "
            f"1 client p50 {at(name, 1, lambda r: r.percentile(0.5)):.2f}s vs "
            f"{at(serial, 1, lambda r: r.percentile(0.5)):.2f}s"
        )


def section_batch_cost(folder: Path, args) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxmesh.rpc.cores import cpu_shares, host_cores
    from fluxmesh.services.runtime.compile import compile_blocks

    torch.set_num_threads(cpu_shares(host_cores())["denoiser"])  # as the denoiser stage runs

    def load() -> FluxTransformer2DModel:
        return FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", local_files_only=True).eval()

    variants = {"eager": load(), "compiled": load()}
    compile_blocks(variants["compiled"])
    config = variants["eager"].config
    seq = (args.height // 16) * (args.width // 16)
    batches, lengths = (1, 2, 4, 8), (512, 256)

    def inputs(batch: int, length: int) -> dict:
        return {
            "hidden_states": torch.randn(batch, seq, config.in_channels),
            "encoder_hidden_states": torch.randn(batch, length, config.joint_attention_dim),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim),
            "timestep": torch.full((batch,), 0.5),
            "guidance": torch.full((batch,), 3.5),
            "txt_ids": torch.zeros(length, 3),
            "img_ids": torch.zeros(seq, 3),
            "return_dict": False,
        }

    samples = {(v, n, b): [] for v in variants for n in lengths for b in batches}
    loads: list[float] = []
    with torch.inference_mode():
        started = time.perf_counter()
        for batch in (1, 2):  # compile now (both graphs), not inside a timing
            variants["compiled"](**inputs(batch, 512))
        compile_seconds = time.perf_counter() - started
        for _ in range(args.rounds * 3):  # ABAB: every variant, length and batch once per round
            for length in lengths:
                for batch in batches:
                    for variant, model in variants.items():
                        x = inputs(batch, length)
                        samples[(variant, length, batch)] += timed(lambda m=model, x=x: m(**x), repeats=1, warmup=0)
            loads.append(os.getloadavg()[0])
    print(
        f"== batch-cost: one transformer forward, {args.width}x{args.height}, torch threads "
        f"{torch.get_num_threads()}, median of {args.rounds * 3} alternating rounds, load {statistics.median(loads):.1f}; "
        f"compiling took {compile_seconds:.0f} s"
    )
    for variant in variants:
        for length in lengths:
            per_image = {b: statistics.median(samples[(variant, length, b)]) / b for b in batches}
            print(
                f"  {variant:8s} T5 {length}: "
                + "   ".join(
                    f"batch {b}: {t * 1000:6.1f} ms/image ({per_image[1] / t:.2f}x)" for b, t in per_image.items()
                )
            )
    for length in lengths:
        ratios = [
            statistics.median(samples[("eager", length, b)]) / statistics.median(samples[("compiled", length, b)])
            for b in batches
        ]
        print(
            f"  compiled speed-up, T5 {length}: " + "   ".join(f"batch {b}: {r:.2f}x" for b, r in zip(batches, ratios))
        )
    print("  where a forward's time goes (T5 512, under torch's profiler, which adds its own overhead):")
    for variant, batch in (("eager", 1), ("compiled", 1), ("compiled", 2), ("compiled", 4)):
        print(f"  {variant:8s} batch {batch}: " + forward_split(variants[variant], inputs(batch, 512), batch))


def forward_split(model, inputs: dict, batch: int, forwards: int = 5) -> str:
    """Milliseconds per image in attention, in matrix products and in everything else, from torch's
    profiler. Attention and the matrix products are the same kernels eager and compiled (inductor
    calls them, it does not generate them), so only "everything else" is what compile can fuse."""
    import torch

    with torch.inference_mode():
        model(**inputs)
        with torch.profiler.profile(with_flops=True) as profile:
            started = time.perf_counter()
            for _ in range(forwards):
                model(**inputs)
            wall = time.perf_counter() - started
    attention = matmul = flops = 0.0  # seconds over all forwards, and the products' FLOPs
    for event in profile.key_averages():
        if "scaled_dot_product" in event.key:
            attention += event.self_cpu_time_total / 1e6
        elif event.key in ("aten::addmm", "aten::mm", "aten::bmm"):
            matmul += event.self_cpu_time_total / 1e6
            flops += event.flops
    rest = wall - attention - matmul

    def ms(seconds: float) -> str:
        return f"{seconds * 1000 / forwards / batch:5.1f}"

    return (
        f"{ms(wall)} ms/image: attention {ms(attention)} ({attention / wall:.0%}), matrix products {ms(matmul)} "
        f"({matmul / wall:.0%}, {flops / matmul / 1e9 if matmul else 0:.0f} GFLOP/s), everything else {ms(rest)} "
        f"({rest / wall:.0%})"
    )


def section_prompt_cache(folder: Path, args) -> None:
    import concurrent.futures

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client

    print(
        "== prompt-cache: sequential mode (stages released between turns), bursts of 4 requests of one "
        f"prompt, {args.width}x{args.height}, {args.steps} steps"
    )
    for name, mib in (("--prompt-cache-mib 0", "0"), ("prompt cache on (default)", "256")):
        with start_local(
            str(folder),
            port=free_port(),
            common_args=["--residency", "standby"],
            orchestrator_args=["--sequential", "--prompt-cache-mib", mib],
        ) as cluster:

            def one(seed: int):
                with Client(cluster.address, timeout=600) as client:
                    return client.generate(PROMPT, width=args.width, height=args.height, steps=args.steps, seed=seed)

            def encoder_calls() -> int:
                with Client(cluster.address) as client:
                    return int(next(s for s in client.info().stages if s.stage == "encoder").details["requests"])

            for label, seeds in (("first burst", [1, 2, 3, 4]), ("repeat burst", [5, 6, 7, 8])):
                before, started = encoder_calls(), time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    results = list(pool.map(one, seeds))
                wall = time.perf_counter() - started
                print(
                    f"  {name:26s} {label:12s} encoder calls {encoder_calls() - before}   swaps per request "
                    f"{[r.timings.swaps for r in results]}   cached encodes {[r.timings.cached_encodes for r in results]}"
                    f"   {wall:.1f}s"
                )


def section_step_cache(folder: Path, args) -> None:
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client

    policies = [None, "first-block:0.05", "first-block:0.1", "first-block:0.4", "mag:0.06", "taylorseer:2"]
    seconds: dict[str | None, list[float]] = {p: [] for p in policies}
    skipped: dict[str | None, float] = {}
    with start_local(str(folder), port=free_port()) as cluster, Client(cluster.address, timeout=600) as client:
        for policy in policies:  # warm
            client.generate(PROMPT, width=args.width, height=args.height, steps=args.steps, seed=0, cache=policy)
        for round_ in range(args.rounds * 2):
            for policy in policies:
                result = client.generate(
                    PROMPT, width=args.width, height=args.height, steps=args.steps, seed=round_, cache=policy
                )
                seconds[policy].append(result.timings.denoise)
                total = result.blocks_run + result.blocks_skipped
                skipped[policy] = result.blocks_skipped / total if total else 0.0
    base = statistics.median(seconds[None])
    print(
        f"== step-cache: denoise seconds through the four processes, {args.width}x{args.height}, {args.steps} "
        f"steps, median of {args.rounds * 2}"
    )
    for policy in policies:
        median = statistics.median(seconds[policy])
        print(
            f"  {policy or 'off':18s} denoise {median:6.3f}s   time ratio {median / base:.2f}   attention blocks "
            f"skipped {skipped[policy]:.0%}"
        )


SECTIONS = {
    "serving": section_serving,
    "batch-cost": section_batch_cost,
    "prompt-cache": section_prompt_cache,
    "step-cache": section_step_cache,
    "cores": section_cores,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--max-batch",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[2, 4],
        help="comma-separated: the batching configurations' --max-batch, each with and without compile",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "small", size="small")
        for name in args.sections.split(","):
            SECTIONS[name](folder, args)


if __name__ == "__main__":
    main()
