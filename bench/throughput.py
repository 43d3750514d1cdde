"""Throughput under concurrent load: images/s and latency with 1, 4 and 8 clients.

    python bench/throughput.py [--sections cores] [--rounds 3] [--width 256 --height 256 --steps 8]

Everything runs on the `small` tiny model through the real four processes on loopback (SDK ->
orchestrator -> encoder -> denoiser -> vae), measured side by side in one run, rounds
alternating between the configurations so drift on a noisy machine hits them alike; figures
are medians over rounds.

Sections:
  cores    `fluxmesh up`'s CPU threads: torch's default in every stage (all cores each) against
           the cores divided between the stages (fluxmesh.rpc.cores): 8 requests one after
           another vs 8 at once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import tiny_model

PROMPT = "a red fox in the snow, highly detailed"


@dataclass
class Load:
    """One burst: `requests` generations from `clients` concurrent clients."""

    clients: int
    requests: int
    wall: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.requests / self.wall

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def burst(address: str, clients: int, requests: int, args, prompts=None, **options) -> Load:
    """Send `requests` generations from `clients` threads, each as soon as its previous one is done."""
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
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        load.wall = time.perf_counter() - started
    finally:
        for client in sdk:
            client.close()
    return load


def section_cores(folder: Path, args) -> None:
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.rpc.cores import divide_cores, host_cores

    configs = {"torch default (all cores per stage)": False,
               f"cores divided {divide_cores(host_cores())}": True}
    results: dict[str, dict[str, list[float]]] = {name: {"serial": [], "concurrent": []} for name in configs}
    clusters = {name: start_local(str(folder), port=free_port(), share_cores=share) for name, share in configs.items()}
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
    print(f"== cores: 8 requests serial vs 8 at once, {args.width}x{args.height}, {args.steps} steps, "
          f"{host_cores()} cores, median of {args.rounds} rounds")
    for name, figures in results.items():
        serial, concurrent = statistics.median(figures["serial"]), statistics.median(figures["concurrent"])
        print(f"  {name:40s} serial {serial:6.2f} img/s   8 at once {concurrent:6.2f} img/s   "
              f"concurrent/serial {concurrent / serial:.2f}")


SECTIONS = {"cores": section_cores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="cores", help=f"comma-separated, of {', '.join(SECTIONS)}")
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
