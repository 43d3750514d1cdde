"""Sequential vs resident placement on CPU: peak RSS per stage, whole-system peak, swap times.

    python bench/placement_cpu.py [--repeats 5] [--burst 4] [--size 256] [--steps 4]

The `small` tiny model, three stage processes (1 torch thread each) and two orchestrators on
the same stages: resident mode (every stage loaded) and sequential mode (`--sequential`; on CPU
a released stage drops its weights, as `--release-to auto` does there). Each repeat runs both
modes alternately: a warm-up request, then a burst of `--burst` concurrent requests while every
stage process's RSS is sampled every 5 ms. Printed: medians over the repeats of each stage's peak
RSS, the peak of their sum (whole system: the orchestrators hold no weights), the RSS of the
released stages after a sequential burst, and per-stage load/release times from the stages' own
residency logs.

The whole run is done twice: with glibc's `malloc_trim` after a release (the default) and
without (FLUXMESH_MALLOC_TRIM=0), to show what returning freed heap memory to the OS is worth.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from _common import tiny_model

STAGES = ("encoder", "denoiser", "vae")
PROMPT = "a red fox in the snow, highly detailed"
MIB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "small", size="small")
        for trim in (True, False):
            report(trim, measure(model, args, trim), args)


def measure(model: Path, args, trim: bool) -> dict:
    import psutil

    from fluxmesh.cli.supervisor import Cluster, free_port, start_local
    from fluxmesh.client import Client
    from fluxmesh.rpc.security import STAGE_TOKEN_ENV

    env = {"FLUXMESH_MALLOC_TRIM": "1" if trim else "0"}
    os.environ.update(env)  # the stage processes inherit it
    results = {"resident": [], "sequential": [], "released": [], "swaps": [], "equal": True}
    with start_local(
        str(model),
        port=free_port(),
        common_args=["--threads", "1", "--residency", "standby"],
        orchestrator_args=["--sequential", "--max-active", str(args.burst)],
        timeout=300,
    ) as cluster:
        stages = {c.name: c for c in cluster.children if c.name in STAGES}
        processes = {name: psutil.Process(c.process.pid) for name, c in stages.items()}
        resident = Cluster()
        port = free_port()
        # The stages demand the cluster's stage token; they start released, so this resident-mode
        # orchestrator is NOT_SERVING until they are loaded below: wait for its port only.
        resident.start(
            "resident",
            [
                "serve",
                "orchestrator",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-active",
                str(args.burst),
                "--stage-token-env",
                STAGE_TOKEN_ENV,
                *[f"--{s}={stages[s].address}" for s in STAGES],
            ],
            f"127.0.0.1:{port}",
            {STAGE_TOKEN_ENV: cluster.stage_token},
            probe_tcp_only=True,
        )
        with resident:
            resident.wait_serving(120)

            def burst(address: str, seeds) -> list:
                def one(seed):
                    with Client(address, timeout=600) as client:
                        return client.generate(PROMPT, width=args.size, height=args.size, steps=args.steps, seed=seed)

                with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
                    return list(pool.map(one, seeds))

            def sampled(address: str) -> tuple[dict, int, list]:
                peaks, total, done = dict.fromkeys(STAGES, 0), [0], threading.Event()

                def sample():
                    while not done.is_set():
                        now = {name: p.memory_info().rss for name, p in processes.items()}
                        for name, rss in now.items():
                            peaks[name] = max(peaks[name], rss)
                        total[0] = max(total[0], sum(now.values()))
                        time.sleep(0.005)

                thread = threading.Thread(target=sample)
                thread.start()
                try:
                    out = burst(address, list(range(100, 100 + args.burst)))
                finally:
                    done.set()
                    thread.join()
                return peaks, total[0], out

            for _ in range(args.repeats):
                for stage in stages.values():
                    _residency(stage.address, "Load", cluster.stage_token)
                burst(resident.address, [1])
                peaks, total, resident_out = sampled(resident.address)
                results["resident"].append((peaks, total))

                burst(cluster.address, [1])  # warm-up: its first swap releases the stages loaded above
                since = time.time()
                peaks, total, sequential_out = sampled(cluster.address)
                results["sequential"].append((peaks, total))
                results["equal"] &= [r.image_data for r in resident_out] == [r.image_data for r in sequential_out]
                results["released"].append({n: p.memory_info().rss for n, p in processes.items()})
                results["swaps"].append(
                    ([r.timings.swaps for r in sequential_out], _transitions(stages, since, cluster.stage_token))
                )
    return results


def _residency(address: str, method: str, token: str):
    import grpc

    from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

    request = residency_pb2.LoadRequest() if method == "Load" else residency_pb2.ResidencyStatusRequest()
    with grpc.insecure_channel(address) as channel:
        return getattr(residency_pb2_grpc.ResidencyStub(channel), method)(
            request, timeout=300, metadata=(("authorization", f"Bearer {token}"),)
        )


def _transitions(stages: dict, since: float, token: str) -> dict[str, list[tuple[str, float]]]:
    """(kind, seconds) of each stage's load/release transitions that started after `since`."""
    found = {}
    for name, stage in stages.items():
        status = _residency(stage.address, "Status", token)
        found[name] = [
            ("load" if t.to_state == "resident" else "release", t.finished_unix - t.started_unix)
            for t in status.transitions
            if t.started_unix >= since
        ]
    return found


def report(trim: bool, results: dict, args) -> None:
    med = statistics.median
    print(
        f"\n== small model, {args.size}x{args.size}, {args.steps} steps, bursts of {args.burst}, "
        f"{args.repeats} repeats, malloc_trim after release: {'on' if trim else 'OFF'} =="
    )
    print(f"{'':24s} {'resident':>10s} {'sequential':>11s} {'ratio':>7s}")
    for stage in STAGES:
        r = med([p[stage] for p, _ in results["resident"]]) / MIB
        s = med([p[stage] for p, _ in results["sequential"]]) / MIB
        print(f"peak RSS {stage:15s} {r:9.0f}M {s:10.0f}M {s / r:7.3f}")
    r = med([t for _, t in results["resident"]]) / MIB
    s = med([t for _, t in results["sequential"]]) / MIB
    print(f"{'peak RSS, all stages':24s} {r:9.0f}M {s:10.0f}M {s / r:7.3f}   (peak of the sum, sampled every 5 ms)")
    for stage in ("encoder", "denoiser"):
        print(f"RSS {stage} released     {med([x[stage] for x in results['released']]) / MIB:21.0f}M")
    swaps = [sum(s for s in counts) / len(counts) for counts, _ in results["swaps"]]
    print(f"swaps per request in the burst: {med(swaps):.0f} (all requests of a burst share the same 3)")
    for stage in STAGES:
        loads = [sec for _, t in results["swaps"] for kind, sec in t[stage] if kind == "load"]
        releases = [sec for _, t in results["swaps"] for kind, sec in t[stage] if kind == "release"]
        print(
            f"{stage:9s} load {med(loads) * 1000 if loads else 0:7.1f} ms   "
            f"release {med(releases) * 1000 if releases else 0:7.1f} ms   (medians of {len(loads)}, {len(releases)})"
        )
    print(f"images identical in both modes: {results['equal']}")


if __name__ == "__main__":
    main()
