"""Load: many concurrent clients against the four processes; does anything fail, leak or stall?

    python bench/load.py [--requests 200 --clients 20] [--max-queue 32] [--size tiny]

Starts encoder, denoiser, vae and orchestrator on loopback (tiny model, one torch thread per
stage), then `--clients` threads send `--requests` generations in total, as fast as answers come
back. Reports completed, rejected (RESOURCE_EXHAUSTED: the bounded queue doing its job; the
client retries after `--backoff`), failed (anything else; must be 0), client-side latency p50/p99
of completed requests (from the first try), and the resident memory (RSS) of each process after
request 20 (warm) and after the last one: growth under 5% means no per-request leak.
`--max-queue 8` makes the queue overflow, to see rejections.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from _common import tiny_model

PROMPT = "a red fox in the snow, highly detailed"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--warm", type=int, default=20, help="RSS baseline after this many requests")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-active", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--backoff", type=float, default=0.25, help="seconds before retrying a rejected request")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import grpc
    import psutil

    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client, FluxmeshError

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / args.size, size=args.size)
        orchestrator_args = ["--max-active", str(args.max_active), "--max-queue", str(args.max_queue)]
        with start_local(
            str(folder), port=free_port(), common_args=["--threads", "1"], orchestrator_args=orchestrator_args
        ) as cluster:
            processes = {child.name: psutil.Process(child.process.pid) for child in cluster.children}
            issued = iter(range(args.requests))
            lock = threading.Lock()
            outcomes: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            latencies: list[float] = []
            rss: dict[str, dict[str, int]] = {}

            def snapshot(label: str) -> None:
                rss[label] = {name: process.memory_info().rss for name, process in processes.items()}

            def client_loop() -> None:
                with Client(cluster.address, timeout=300) as client:
                    while True:
                        with lock:
                            index = next(issued, None)
                        if index is None:
                            return
                        started = time.perf_counter()
                        while True:
                            try:
                                client.generate(
                                    PROMPT, width=args.width, height=args.height, steps=args.steps, seed=index
                                )
                                outcome = "completed"
                            except FluxmeshError as error:
                                if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                                    with lock:
                                        outcomes["rejected"] += 1
                                    time.sleep(args.backoff)  # as a polite client would, then again
                                    continue
                                outcome = "failed"
                                errors[f"{error.code.name}: {error.message[:80]}"] += 1
                            break
                        elapsed = time.perf_counter() - started  # from the first try, as the user waits
                        with lock:
                            outcomes[outcome] += 1
                            if outcome == "completed":
                                latencies.append(elapsed)
                            if outcomes["completed"] + outcomes["failed"] == args.warm:
                                snapshot("warm")

            started = time.perf_counter()
            threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            snapshot("end")

    print(
        f"load: {args.requests} requests from {args.clients} clients, {args.width}x{args.height}, "
        f"{args.steps} steps, {args.size} model, --max-active {args.max_active} --max-queue {args.max_queue}"
    )
    print(
        f"  completed {outcomes['completed']}, rejected (RESOURCE_EXHAUSTED, retried after {args.backoff}s) "
        f"{outcomes['rejected']}, failed {outcomes['failed']}   in {wall:.1f}s "
        f"({outcomes['completed'] / wall:.1f} images/s)"
    )
    for error, count in errors.items():
        print(f"    failed x{count}: {error}")
    if latencies:
        print(
            f"  latency of completed: p50 {statistics.median(latencies):.3f}s, p99 {percentile(latencies, 0.99):.3f}s"
        )
    print(f"  RSS after request {args.warm} -> after request {args.requests}:")
    for name in rss["end"]:
        before, after = rss["warm"][name], rss["end"][name]
        print(
            f"    {name:12s} {before / 2**20:8.1f} MiB -> {after / 2**20:8.1f} MiB  ({(after - before) / before:+.1%})"
        )


if __name__ == "__main__":
    main()
