"""The one-16-GB-card promise at full size, with CPU memory standing in for the card.

    python bench/full_size_sequential.py [--work-dir DIR] [--steps 1] [--size 256] [--keep]

FLUX.1-dev-sized random weights in the real layouts (written once into --work-dir from the real
configs, `fluxmesh.services.tools.full_size`, each matrix tiling one random block so writing
them takes minutes: T5-XXL and CLIP-L safetensors in bfloat16, the
transformer quantized to a Q8_0 GGUF, then its bf16 shards deleted, the VAE) are served the way
`fluxmesh up --sequential --transformer-gguf` serves them, every stage on the CPU in bfloat16:
stages start released and load in turns, a released stage's memory is freed (--release-to disk,
what `auto` means on a CPU). One image at --size for --steps steps keeps the compute at minutes.

Printed:
* the whole system's peak RSS (the sum over the four processes, sampled every 50 ms) next to the
  sum of the stages' weights, which is what resident mode would hold at once (target: peak <=
  14 GiB where resident needs ~22 GiB);
* each stage's own peak RSS and its RSS after its release (did the memory go back to the OS?),
  and MemAvailable before, at the peak and after;
* each swap's load and release seconds, from the stages' own Residency transition logs.

Disk: ~43 GB at the peak of the preparation (bf16 transformer + its GGUF), ~21 GB kept; RAM:
about the peak it prints plus the page cache. Deletes --work-dir at the end unless --keep.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

GIB = 2**30
STAGES = ("encoder", "denoiser", "vae")
PROMPT = "a red fox in the snow at dusk, highly detailed, national geographic"


def _tiled_random_tensor(key: str, shape: tuple[int, ...], dtype, generator, device):
    """full_size's weights (N(0, 1/fan_in) matrices, ones, zeros), each matrix a tiling of one
    random 16 MiB block: drawing 17 billion normal values costs an hour on a busy 2-core machine,
    tiling costs a copy. For memory and load times only the bytes count, not their pattern."""
    import torch

    if key.endswith("bias") or len(shape) == 1:
        return _full_size_random_tensor(key, shape, dtype, generator, device)
    global _BLOCK
    if _BLOCK is None:
        _BLOCK = torch.randn(1 << 22, generator=generator, dtype=torch.float32)
    count = math.prod(shape)
    tiled = _BLOCK.repeat(-(-count // _BLOCK.numel()))[:count].reshape(shape)
    return (tiled / math.sqrt(math.prod(shape[1:]))).to(dtype)


_BLOCK = None
_full_size_random_tensor = None


def prepare(work: Path, configs: dict | None = None) -> tuple[Path, Path]:
    global _full_size_random_tensor
    from fluxmesh.services.gguf import quantize_transformer
    from fluxmesh.services.tools import full_size
    from fluxmesh.services.tools.full_size import write_full_size_model

    if _full_size_random_tensor is None:
        _full_size_random_tensor = full_size._random_tensor
        full_size._random_tensor = _tiled_random_tensor

    model, gguf_file = work / "model", work / "flux1-dev-Q8_0.gguf"
    if not (model / "vae" / "config.json").is_file():
        started = time.perf_counter()
        print(f"writing FLUX.1-dev-sized random weights (bf16) to {model} ...", flush=True)
        write_full_size_model(model, weights="random", dtype="bfloat16", device="cpu", configs=configs)
        print(f"  {time.perf_counter() - started:.0f}s", flush=True)
    if not gguf_file.is_file():
        started = time.perf_counter()
        print(f"quantizing the transformer to Q8_0: {gguf_file} ...", flush=True)
        quantize_transformer(model, gguf_file, "Q8_0")
        for shard in (model / "transformer").glob("*.safetensors*"):
            shard.unlink()  # beside a GGUF the denoiser reads only transformer/config.json
        print(f"  {time.perf_counter() - started:.0f}s ({gguf_file.stat().st_size / GIB:.2f} GiB)", flush=True)
    return model, gguf_file


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """Peak of the processes' summed RSS, and each one's own peak, every 50 ms."""

    def __init__(self, pids: dict[int, str]):
        import psutil

        self.processes = {name: psutil.Process(pid) for pid, name in pids.items()}
        self._psutil = psutil
        self.peak_total = 0
        self.peak = dict.fromkeys(self.processes, 0)
        self.available_at_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        psutil = self._psutil
        while not self._stop.is_set():
            total = 0
            for name, process in self.processes.items():
                try:
                    rss = process.memory_info().rss
                except psutil.Error:  # a process that just exited
                    rss = 0
                self.peak[name] = max(self.peak[name], rss)
                total += rss
            if total > self.peak_total:
                self.peak_total, self.available_at_peak = total, mem_available()
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("flux-dev-full-size-cpu"))
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=512,
        help="T5 length (FLUX.1-dev's is 512; fewer cut the compute, not the weights)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: all cores)")
    parser.add_argument("--prepare-only", action="store_true", help="write the files, then stop")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="FLUX.1-dev's structure at toy widths: the same path in seconds (its figures mean nothing)",
    )
    parser.add_argument("--keep", action="store_true", help="keep --work-dir (the files are reused next time)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    if args.dry_run and args.work_dir == parser.get_default("work_dir"):
        args.work_dir = Path("flux-dev-full-size-cpu-dry-run")
    started = time.perf_counter()
    try:
        if args.dry_run:
            from gpu_flux_dev_sequential import TINY  # the toy widths the GPU bench's --dry-run uses
        model, gguf_file = prepare(args.work_dir, TINY if args.dry_run else None)
        prepared = time.perf_counter() - started
        if not args.prepare_only:
            measure(model, gguf_file, args)
    finally:
        if not args.keep:
            shutil.rmtree(args.work_dir, ignore_errors=True)
    print(f"\npreparation {prepared:.0f}s, whole run {time.perf_counter() - started:.0f}s\ncommand: {command}")


def measure(model: Path, gguf_file: Path, args) -> None:
    import grpc

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client
    from fluxmesh.rpc.security import ClientSecurity
    from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

    common = ["--device", "cpu", "--dtype", "bfloat16", "--residency", "standby"]
    if args.threads:
        common += ["--threads", str(args.threads)]
    available_before = mem_available()
    with start_local(
        str(model),
        port=free_port(),
        common_args=common,
        stage_args={
            "denoiser": ["--transformer-gguf", str(gguf_file)],
            "encoder": ["--max-sequence-length", str(args.text_tokens)],
        },
        orchestrator_args=["--sequential", "--release-to", "disk", "--max-active", "1"],
        timeout=1800,
    ) as cluster:
        pids = {child.process.pid: child.name for child in cluster.children}
        sampler = RssSampler(pids)
        since = time.time()
        t0 = time.perf_counter()
        with Client(cluster.address, timeout=7200) as client:
            result = client.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, guidance=3.5, seed=1)
        seconds = time.perf_counter() - t0
        # Residency calls carry the stage token, where this fluxmesh's start_local gives its stages one
        token = getattr(cluster, "stage_token", None)
        metadata = ClientSecurity(token=token).metadata() if token else ()
        # the VAE ran last and is still loaded: release it too, as the next request's encode would
        vae = next(c for c in cluster.children if c.name == "vae")
        with grpc.insecure_channel(vae.address) as channel:
            residency_pb2_grpc.ResidencyStub(channel).Release(
                residency_pb2.ReleaseRequest(), timeout=600, metadata=metadata
            )
        time.sleep(0.5)
        sampler.stop()
        statuses = {}
        for child in cluster.children:
            if child.name not in STAGES:
                continue
            with grpc.insecure_channel(child.address) as channel:
                statuses[child.name] = residency_pb2_grpc.ResidencyStub(channel).Status(
                    residency_pb2.ResidencyStatusRequest(), timeout=60, metadata=metadata
                )
        with Client(cluster.address) as client:
            info = {stage.stage: stage for stage in client.info().stages}
    available_after = mem_available()

    from fluxmesh.services.tools.planning import make_plan

    # what each stage holds loaded: from the files' headers (tests check this equals Info.weight_bytes)
    plan = make_plan(model, vram=16 * GIB, width=args.size, height=args.size, transformer_gguf=gguf_file)
    weights = {need.stage: need.weight_bytes for need in plan.stages}
    print(
        f"\n== FLUX.1-dev-sized, Q8_0 transformer, sequential on the CPU in bfloat16: {args.size}x{args.size}, "
        f"{args.steps} step(s), {args.text_tokens} text tokens, one image in {seconds:.0f}s (swaps {result.timings.swaps}, {result.timings.swap:.0f}s) =="
    )
    print(f"{'stage':9s} {'peak RSS':>10s} {'RSS released':>13s} {'loads (s)':>12s} {'releases (s)':>13s}")
    for stage in STAGES:
        status = statuses[stage]
        mine = [t for t in status.transitions if t.started_unix >= since]
        loads = [f"{t.finished_unix - t.started_unix:.1f}" for t in mine if t.to_state == "resident"]
        releases = [f"{t.finished_unix - t.started_unix:.1f}" for t in mine if t.to_state != "resident"]
        print(
            f"{stage:9s} {sampler.peak[stage] / GIB:8.2f}Gi {status.rss_bytes / GIB:11.2f}Gi "
            f"{','.join(loads):>12s} {','.join(releases):>13s}   {status.state}"
        )
    print(f"orchestrator peak RSS {sampler.peak['orchestrator'] / GIB:.2f} GiB")
    print(
        f"whole system peak RSS: {sampler.peak_total / GIB:.2f} GiB "
        f"({'within' if sampler.peak_total <= 14 * GIB else 'OVER'} the 14 GiB target)"
    )
    processes = sum(min(sampler.peak[stage], statuses[stage].rss_bytes) for stage in STAGES)
    resident = sum(weights.values()) + processes + sampler.peak["orchestrator"]
    print(
        f"resident mode would hold at once: weights {sum(weights.values()) / GIB:.2f} GiB ("
        + ", ".join(f"{s} {w / GIB:.2f}" for s, w in weights.items())
        + f") + the processes' own {(processes + sampler.peak['orchestrator']) / GIB:.2f} GiB = {resident / GIB:.2f} GiB"
        f"; sequential/resident {sampler.peak_total / resident:.2f}"
    )
    print(
        f"MemAvailable: before {available_before / GIB:.2f} GiB, at the peak {sampler.available_at_peak / GIB:.2f}"
        f" GiB, after the release {available_after / GIB:.2f} GiB"
    )
    print(
        "stages' own Info peak_memory_bytes (peak RSS): "
        + ", ".join(f"{s} {info[s].peak_memory_bytes / GIB:.2f}Gi" for s in STAGES if s in info)
    )


if __name__ == "__main__":
    main()
