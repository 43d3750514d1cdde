"""FLUX.1-dev on one 16 GB-class GPU: sequential mode with a Q8_0 transformer, measured.

    python bench/gpu_flux_dev_sequential.py            # one CUDA GPU; ~60 GB disk, ~40 GB RAM
    python bench/gpu_flux_dev_sequential.py --dry-run  # the same path on CPU, tiny config, seconds

No download: the model folder is written from FLUX.1-dev's own configs with random weights
(`fluxmesh.services.tools.full_size`, bf16, drawn on the GPU), the transformer is quantized to Q8_0
GGUF with `fluxmesh.services.gguf.quantize_transformer` (city96 layout) and its bf16 shards are
then deleted (the denoiser reads only transformer/config.json beside a GGUF). Both are kept in
--work-dir and reused by later runs.

Then the four processes start as `fluxmesh up --sequential --transformer-gguf ...` starts them
(stages on --device in bf16, standby = offloaded to CPU memory, orchestrator --sequential) and
--requests requests run at 1024x1024 for 28 steps: the first warms up (CUDA kernels, first load
from disk), the rest are measured as one burst. Printed:

* per stage: torch's peak allocated CUDA memory (Info.peak_memory_bytes) and the process's peak
  GPU memory as nvidia-smi sees it (adds the CUDA context and allocator cache);
* the whole GPU's peak memory used, sampled every 100 ms by nvidia-smi (target: <= 14 GiB, so
  it fits a 16 GB card with room);
* seconds per denoising step (median of the Step events of the measured requests), swaps and
  swap seconds per request, load/release times per stage, total seconds;
* `fluxmesh plan`'s estimate for the same files, to compare with what was measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
STAGES = ("encoder", "denoiser", "vae")
PROMPT = "a red fox in the snow at dusk, highly detailed, national geographic"

# --dry-run: FLUX.1-dev's structure at toy widths, so the whole path runs on a CPU in seconds.
TINY = {
    "transformer": {
        "attention_head_dim": 16,
        "axes_dims_rope": [4, 6, 6],
        "num_attention_heads": 2,
        "num_layers": 1,
        "num_single_layers": 1,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 32,
    },
    "text_encoder": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
    "text_encoder_2": {"d_model": 64, "d_kv": 16, "d_ff": 64, "num_layers": 1, "num_heads": 2},
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("flux-dev-random"))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=3, help="1 warm-up + the rest as one measured burst")
    parser.add_argument("--qtype", default="Q8_0")
    parser.add_argument("--dry-run", action="store_true", help="tiny config on CPU, 64x64, 2 steps")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the model and the GGUF into --work-dir, then stop (for per-command time limits)",
    )
    args = parser.parse_args()
    if args.dry_run:
        args.device, args.width, args.height, args.steps = "cpu", 64, 64, 2
        if args.work_dir == parser.get_default("work_dir"):
            args.work_dir = Path("flux-dev-random-dry-run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    on_gpu = args.device.startswith("cuda")
    dtype = "bfloat16" if on_gpu else "float32"

    model, gguf_file = prepare(args, dtype)
    print_plan(model, gguf_file, args, dtype)
    if args.prepare_only:
        return
    measured = run(model, gguf_file, args, dtype, on_gpu)
    report(measured, args, command, on_gpu)


def prepare(args, dtype: str) -> tuple[Path, Path]:
    from fluxmesh.services.gguf import quantize_transformer
    from fluxmesh.services.tools.full_size import write_full_size_model

    model = args.work_dir / "model"
    gguf_file = args.work_dir / f"flux1-dev-{args.qtype}.gguf"
    if not (model / "vae" / "config.json").is_file():
        started = time.perf_counter()
        print(f"writing FLUX.1-dev-sized random weights to {model} ...", flush=True)
        write_full_size_model(
            model,
            weights="random",
            dtype=dtype,
            configs=TINY if args.dry_run else None,
            device=args.device if args.device.startswith("cuda") else "cpu",
        )
        print(f"  done in {time.perf_counter() - started:.0f}s", flush=True)
    if not gguf_file.is_file():
        started = time.perf_counter()
        print(f"quantizing the transformer to {args.qtype}: {gguf_file} ...", flush=True)
        quantize_transformer(model, gguf_file, args.qtype)
        for shard in (model / "transformer").glob("*.safetensors*"):
            shard.unlink()  # the bf16 transformer is not needed beside the GGUF (its config stays)
        print(f"  done in {time.perf_counter() - started:.0f}s ({gguf_file.stat().st_size / GIB:.2f} GiB)", flush=True)
    return model, gguf_file


def print_plan(model: Path, gguf_file: Path, args, dtype: str) -> None:
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "plan",
            "--model",
            str(model),
            "--vram",
            "16GiB",
            "--transformer-gguf",
            str(gguf_file),
            "--width",
            str(args.width),
            "--height",
            str(args.height),
            "--dtype",
            dtype,
        ],
        capture_output=True,
        text=True,
    )
    print("\n$ fluxmesh plan ...\n" + (plan.stdout or plan.stderr), flush=True)


class GpuSampler:
    """nvidia-smi every 100 ms: the whole GPU's memory used and each process's."""

    def __init__(self, index: int):
        self.total_peak = 0
        self.process_peak: dict[int, int] = {}
        self._procs = [
            subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    str(index),
                    "--query-gpu=memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            ),
            subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    str(index),
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "100",
                ],
                stdout=subprocess.PIPE,
                text=True,
            ),
        ]
        self._threads = [
            threading.Thread(target=self._read_total, daemon=True),
            threading.Thread(target=self._read_processes, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_total(self) -> None:
        for line in self._procs[0].stdout:
            if line.strip().isdigit():
                self.total_peak = max(self.total_peak, int(line) * 2**20)

    def _read_processes(self) -> None:
        for line in self._procs[1].stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                pid, used = int(parts[0]), int(parts[1]) * 2**20
                self.process_peak[pid] = max(self.process_peak.get(pid, 0), used)

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
            proc.wait()


def run(model: Path, gguf_file: Path, args, dtype: str, on_gpu: bool) -> dict:
    import grpc

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client, Result, Step
    from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

    burst = max(1, args.requests - 1)
    sampler = GpuSampler(int(args.device.partition(":")[2] or 0)) if on_gpu else None
    started = time.perf_counter()
    with start_local(
        str(model),
        port=free_port(),
        common_args=["--device", args.device, "--dtype", dtype, "--residency", "standby"],
        stage_args={"denoiser": ["--transformer-gguf", str(gguf_file)]},
        orchestrator_args=["--sequential", "--max-active", str(burst)],
        timeout=1800,
    ) as cluster:
        print(f"four processes SERVING after {time.perf_counter() - started:.0f}s", flush=True)

        def one(seed: int) -> tuple[Result, list[float]]:
            steps, result = [], None
            with Client(cluster.address, timeout=3600) as client:
                for event in client.stream(
                    PROMPT, width=args.width, height=args.height, steps=args.steps, guidance=3.5, seed=seed
                ):
                    if isinstance(event, Step):
                        steps.append(event.seconds)
                    elif isinstance(event, Result):
                        result = event
            return result, steps

        t0 = time.perf_counter()
        one(0)
        warmup = time.perf_counter() - t0
        since = time.time()
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(burst) as pool:
            measured = list(pool.map(one, range(1, 1 + burst)))
        burst_seconds = time.perf_counter() - t0
        with Client(cluster.address) as client:
            info = {s.stage: s for s in client.info().stages}
        pids = {c.process.pid: c.name for c in cluster.children}
        transitions = {}
        for child in cluster.children:
            if child.name in STAGES:
                with grpc.insecure_channel(child.address) as channel:
                    status = residency_pb2_grpc.ResidencyStub(channel).Status(
                        residency_pb2.ResidencyStatusRequest(),
                        metadata=(("authorization", f"Bearer {cluster.stage_token}"),),
                    )
                transitions[child.name] = [
                    (t.to_state, t.finished_unix - t.started_unix)
                    for t in status.transitions
                    if t.started_unix >= since
                ]
    if sampler is not None:
        sampler.stop()
    return {
        "info": info,
        "measured": measured,
        "warmup": warmup,
        "burst_seconds": burst_seconds,
        "transitions": transitions,
        "sampler": sampler,
        "pids": pids,
    }


def report(m: dict, args, command: str, on_gpu: bool) -> None:
    med = statistics.median
    print(
        f"\n== FLUX.1-dev-sized, {args.qtype} transformer, sequential mode on {args.device}: "
        f"{args.width}x{args.height}, {args.steps} steps =="
    )
    print(f"{'stage':9s} {'torch peak allocated':>22s} {'process peak (nvidia-smi)':>27s}")
    sampler = m["sampler"]
    for stage in STAGES:
        pid = next((p for p, name in m["pids"].items() if name == stage), None)
        smi = f"{sampler.process_peak.get(pid, 0) / GIB:.2f}Gi" if sampler else "-"
        print(
            f"{stage:9s} {m['info'][stage].peak_memory_bytes / GIB:20.2f}Gi {smi:>27s}"
            + ("" if on_gpu else "   (on CPU: peak RSS)")
        )
    if sampler:
        verdict = "within" if sampler.total_peak <= 14 * GIB else "OVER"
        print(f"whole GPU peak used: {sampler.total_peak / GIB:.2f} GiB ({verdict} the 14 GiB target)")
    steps = [s for _, per_request in m["measured"] for s in per_request]
    print(f"seconds per step: {med(steps):.3f} (median of {len(steps)} steps over {len(m['measured'])} requests)")
    results = [r for r, _ in m["measured"]]
    print(
        f"measured burst of {len(results)}: {m['burst_seconds']:.1f}s; swaps per request "
        f"{[r.timings.swaps for r in results]}, swap seconds {[round(r.timings.swap, 2) for r in results]}"
    )
    print(f"warm-up request (first loads from disk, CUDA init): {m['warmup']:.1f}s")
    for stage, transitions in m["transitions"].items():
        loads = [s for to, s in transitions if to == "resident"]
        releases = [s for to, s in transitions if to != "resident"]
        print(f"{stage:9s} load {med(loads) if loads else 0:6.2f}s   release {med(releases) if releases else 0:6.2f}s")
    print(f"\ncommand: {command}")


if __name__ == "__main__":
    main()
