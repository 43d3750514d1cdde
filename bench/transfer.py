"""Per-hop transfer rate of a T5-XXL-sized embedding (512x4096 bf16, 4 MiB) through fluxmesh's
gRPC plumbing.

    python bench/transfer.py [--repeats 30] [--rounds 3] [--dtype bfloat16|float32]

A stand-in encoder stage (the real `fluxmesh.rpc.server.Server`, the real generated servicer
base, a precomputed EncodeResponse, no model) runs in its own process; the orchestrator's real
`EncoderClient` calls it over loopback from another. One call = one hop: serialise, send,
receive, parse. Both processes set up glibc's allocator as fluxmesh's do
(`fluxmesh.rpc.allocator`); alternate rounds run with glibc's defaults instead
(FLUXMESH_MALLOC_TUNING=0), so the print shows what that setting is worth, side by side.
Target: >= 1 GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from _common import median

SHAPE = (1, 512, 4096)


def _serve(port: int, dtype: str, tuned: bool, ready) -> None:
    _set_up_allocator(tuned)
    from fluxmesh.rpc.server import Server, Service
    from fluxmesh.v1 import common_pb2, encoder_pb2, encoder_pb2_grpc

    itemsize = 2 if dtype == "bfloat16" else 4
    numel = SHAPE[0] * SHAPE[1] * SHAPE[2]
    response = encoder_pb2.EncodeResponse(
        prompt_embeds=common_pb2.Tensor(dtype=dtype, shape=SHAPE, data=bytes(numel * itemsize)),
        pooled_prompt_embeds=common_pb2.Tensor(dtype=dtype, shape=[1, 768], data=bytes(768 * itemsize)),
    )

    class Echo(encoder_pb2_grpc.TextEncoderServicer):
        async def Encode(self, request, context):
            return response

    async def main():
        server = Server(
            [Service("fluxmesh.v1.TextEncoder", Echo(), encoder_pb2_grpc.add_TextEncoderServicer_to_server)],
            address=f"127.0.0.1:{port}",
        )
        await server.start()
        ready.set()
        await server.wait_for_signal()

    asyncio.run(main())


def _set_up_allocator(tuned: bool) -> None:
    import os

    from fluxmesh.rpc.allocator import tune_for_tensor_traffic

    os.environ["FLUXMESH_MALLOC_TUNING"] = "1" if tuned else "0"
    tune_for_tensor_traffic()


def _client(address: str, repeats: int, tuned: bool, results) -> None:
    _set_up_allocator(tuned)
    results.put(asyncio.run(_measure(address, repeats)))


async def _measure(address: str, repeats: int) -> list[float]:
    from fluxmesh.orchestrator.stages import EncoderClient
    from fluxmesh.v1 import encoder_pb2

    client = EncoderClient(address)
    request = encoder_pb2.EncodeRequest(prompts=["x"])
    await client.encode(request, timeout=30)  # warm up the connection
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        reply = await client.encode(request, timeout=30)
        samples.append(time.perf_counter() - started)
        # As the orchestrator does: parse and relay, never read the bytes out (each read copies).
        assert list(reply.prompt_embeds.shape) == list(SHAPE)
    await client.close()
    return samples


def _round(dtype: str, repeats: int, tuned: bool) -> list[float]:
    """Seconds per hop, server and client in fresh processes set up as `tuned` says."""
    from fluxmesh.cli.ports import free_port

    spawn = multiprocessing.get_context("spawn")
    port, ready, results = free_port(), spawn.Event(), spawn.Queue()
    server = spawn.Process(target=_serve, args=(port, dtype, tuned, ready), daemon=True)
    server.start()
    try:
        assert ready.wait(60), "stand-in encoder did not start"
        client = spawn.Process(target=_client, args=(f"127.0.0.1:{port}", repeats, tuned, results))
        client.start()
        samples = results.get(timeout=300)
        client.join()
        return samples
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each allocator setting, alternating")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()

    samples: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for tuned in (True, False):
            samples[tuned] += _round(args.dtype, args.repeats, tuned)
    nbytes = SHAPE[0] * SHAPE[1] * SHAPE[2] * (2 if args.dtype == "bfloat16" else 4)
    print(
        f"512x4096 {args.dtype} ({nbytes / 2**20:.0f} MiB) per hop over loopback, "
        f"{args.rounds} x {args.repeats} calls per setting"
    )
    for tuned, label in ((True, "fluxmesh allocator setup"), (False, "glibc defaults          ")):
        t = median(samples[tuned])
        print(
            f"{label}: median {t * 1000:.2f} ms  ->  {nbytes / t / 1e9:.2f} GB/s  "
            f"(best {nbytes / min(samples[tuned]) / 1e9:.2f} GB/s)"
        )
    speedup = median(samples[False]) / median(samples[True])
    print(f"target >= 1 GB/s with fluxmesh's setup; the setup is {speedup:.2f}x faster than glibc's defaults")


if __name__ == "__main__":
    main()
