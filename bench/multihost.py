"""What the network between hosts costs a generation: loopback, 10 Gbit/s and 1 Gbit/s links.

    sudo python bench/multihost.py [--repeats 5] [--steps 4] [--size 256] [--rates 10gbit,1gbit]

Each run puts the client, the orchestrator and each stage on its own simulated host (a network
namespace on a bridge, tests/netns.py; addresses in 198.18.0.0/24, nothing leaves the machine),
every link shaped both ways with `tc ... tbf` to the rate, and compares with everything on one
host over loopback. The stages run the tiny model in bfloat16, whose T5 embedding has the real
FLUX.1-dev shape (512 x 4096, 4 MiB in bf16), so the bytes on each hop are the real ones while
the compute stays small.

Printed per link (medians of --repeats sequential requests, one warm-up): the client's end-to-end
time; per hop the time the orchestrator saw (call to reply, transfer included) and the time the
stage itself spent (its `fluxmesh_rpc_seconds`); the difference is the network's share. The
encoder -> denoiser embedding crosses two links today (encoder -> orchestrator, orchestrator ->
denoiser): the relay row gives that cost on paper (2 x bytes / rate). Needs root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

PORTS = {"encoder": 50051, "denoiser": 50052, "vae": 50053, "orchestrator": 50050}
METRICS_PORT = 9100
EMBEDDING_BYTES = 512 * 4096 * 2  # T5-XXL at FLUX.1-dev's 512 tokens, bfloat16

CLIENT = r"""
import json, sys, time
from fluxmesh.client import Client
address, repeats, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with Client(address, timeout=600) as client:
    for i in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        # a new prompt each time: the orchestrator caches encodes of a prompt it has seen
        result = client.generate(f"a red fox in the snow, take {i}", width=size, height=size, steps=steps, seed=i)
        t = result.timings
        print(json.dumps({"warmup": i == 0, "total": time.perf_counter() - started, "encode": t.encode,
                          "denoise": t.denoise, "decode": t.decode}), flush=True)
        if i == 0:
            sys.stdin.readline()  # the bench reads the stages' counters before the timed requests
"""

FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
METHODS = {"encoder": "Encode", "denoiser": "Denoise", "vae": "Decode"}


def metrics_port(stage: str) -> int:
    return METRICS_PORT + list(METHODS).index(stage)  # distinct: on loopback they share a host


def wait_serving(run, address: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run([sys.executable, "-m", "fluxmesh.cli", "health", address]).returncode == 0:
            return
        time.sleep(1)
    raise SystemExit(f"{address} not SERVING after {timeout} s")


def measure(model: Path, rate: str | None, args, logs: Path) -> dict:
    """One deployment (`rate` None: one host, loopback), --repeats requests."""
    import netns

    with netns.Network() as network:
        if rate is None:
            host = network.host("single")
            hosts = dict.fromkeys(("client", "orchestrator", "encoder", "denoiser", "vae"), host)
            where = {name: "127.0.0.1" for name in hosts}
        else:
            hosts = {
                name: network.host(name, rate=rate) for name in ("client", "orchestrator", "encoder", "denoiser", "vae")
            }
            where = {name: host.address for name, host in hosts.items()}
        for stage in ("encoder", "denoiser", "vae"):
            hosts[stage].popen(
                [
                    sys.executable,
                    "-m",
                    "fluxmesh.cli",
                    "serve",
                    stage,
                    "--model",
                    str(model),
                    "--host",
                    where[stage],
                    "--port",
                    str(PORTS[stage]),
                    "--dtype",
                    "bfloat16",
                    "--threads",
                    "1",
                    "--metrics-port",
                    str(metrics_port(stage)),
                ],
                log=logs / f"{rate or 'loopback'}-{stage}.log",
            )
        for stage in ("encoder", "denoiser", "vae"):
            wait_serving(hosts[stage].run, f"{where[stage]}:{PORTS[stage]}")
        hosts["orchestrator"].popen(
            [
                sys.executable,
                "-m",
                "fluxmesh.cli",
                "serve",
                "orchestrator",
                "--host",
                where["orchestrator"],
                "--port",
                str(PORTS["orchestrator"]),
                "--max-active",
                "1",
                *[f"--{stage}={where[stage]}:{PORTS[stage]}" for stage in ("encoder", "denoiser", "vae")],
            ],
            log=logs / f"{rate or 'loopback'}-orchestrator.log",
        )
        orchestrator = f"{where['orchestrator']}:{PORTS['orchestrator']}"
        wait_serving(hosts["orchestrator"].run, orchestrator)

        def own(stage: str) -> tuple[float, float]:
            """(sum, count) of the stage's own time in its calls, from its /metrics."""
            url = f"http://{where[stage]}:{metrics_port(stage)}/metrics"
            text = hosts["client"].run([sys.executable, "-c", FETCH, url]).stdout
            total = count = 0.0
            for line in text.splitlines():
                if f'method="{METHODS[stage]}"' in line:
                    if line.startswith("fluxmesh_rpc_seconds_sum"):
                        total = float(line.rsplit(" ", 1)[1])
                    elif line.startswith("fluxmesh_rpc_seconds_count"):
                        count = float(line.rsplit(" ", 1)[1])
            return total, count

        # the warm-up request runs first; stage-side sums are read around the timed ones
        client = hosts["client"].popen(
            [sys.executable, "-c", CLIENT, orchestrator, str(args.repeats), str(args.steps), str(args.size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        rows, before = [], None
        for line in client.stdout:
            row = json.loads(line)
            if row["warmup"]:
                before = {stage: own(stage) for stage in METHODS}
                client.stdin.write("go\n")
                client.stdin.flush()
                continue
            rows.append(row)
        client.wait(60)
        after = {stage: own(stage) for stage in METHODS}
        own_seconds = {
            stage: (after[stage][0] - before[stage][0]) / max(after[stage][1] - before[stage][1], 1)
            for stage in METHODS
        }
    return {"rows": rows, "own": own_seconds}


def rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    unit = next(u for u in units if rate.endswith(u))
    return float(rate[: -len(unit)]) * units[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rates", default="10gbit,1gbit")
    parser.add_argument("--model", type=Path, help="model folder (default: the tiny dev model, written once)")
    args = parser.parse_args()

    import netns

    if (reason := netns.unavailable()) is not None:
        raise SystemExit(f"cannot simulate hosts here: {reason}")
    from _common import tiny_model

    work = Path(tempfile.mkdtemp(prefix="fluxmesh-multihost-"))
    model = args.model or tiny_model(
        Path(tempfile.gettempdir()) / "fluxmesh-bench-tiny-dev-t5xxl", size="tiny", t5_width=4096
    )
    results = {"loopback": measure(model, None, args, work)}
    for rate in args.rates.split(","):
        results[rate] = measure(model, rate, args, work)

    print(
        f"{args.size}x{args.size}, {args.steps} steps, tiny model in bfloat16 with FLUX.1-dev's T5 shape "
        f"(embedding {EMBEDDING_BYTES / 2**20:.0f} MiB); medians of {args.repeats}; logs in {work}"
    )
    print(
        f"{'link':>9} {'total':>8} {'vs loop':>8} | {'encode':>7} {'(own)':>7} | {'denoise':>7} {'(own)':>7} | "
        f"{'decode':>7} {'(own)':>7} | {'network':>8} {'relay on paper':>15}"
    )
    base = statistics.median(r["total"] for r in results["loopback"]["rows"])
    for link, result in results.items():
        rows, own = result["rows"], result["own"]
        med = {key: statistics.median(r[key] for r in rows) for key in ("total", "encode", "denoise", "decode")}
        network = sum(
            med[hop] - own[stage] for hop, stage in (("encode", "encoder"), ("denoise", "denoiser"), ("decode", "vae"))
        )
        relay = "" if link == "loopback" else f"{2 * EMBEDDING_BYTES * 8 / rate_bits(link) * 1000:.1f} ms"
        print(
            f"{link:>9} {med['total'] * 1000:7.1f}ms {med['total'] / base:7.2f}x | "
            f"{med['encode'] * 1000:6.1f}ms {own['encoder'] * 1000:6.1f}ms | "
            f"{med['denoise'] * 1000:6.1f}ms {own['denoiser'] * 1000:6.1f}ms | "
            f"{med['decode'] * 1000:6.1f}ms {own['vae'] * 1000:6.1f}ms | {network * 1000:7.1f}ms {relay:>15}"
        )


if __name__ == "__main__":
    main()
