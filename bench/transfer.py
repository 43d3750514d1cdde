"""Per-hop transfer rate of a T5-XXL-sized embedding (512x4096 bf16, 4 MiB) through fluxmesh's
gRPC plumbing.

    python bench/transfer.py [--repeats 30] [--dtype bfloat16|float32]

A stand-in encoder stage (the real `fluxmesh.rpc.server.Server`, the real generated servicer
base, a precomputed EncodeResponse, no model) runs in its own process; the orchestrator's real
`EncoderClient` calls it over loopback. One call = one hop: serialise, send, receive, parse.
Target: >= 1 GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from _common import median

SHAPE = (1, 512, 4096)


def _serve(port: int, dtype: str, ready) -> None:
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
        server = Server([Service("fluxmesh.v1.TextEncoder", Echo(), encoder_pb2_grpc.add_TextEncoderServicer_to_server)],
                        address=f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_signal()

    asyncio.run(main())


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
        assert len(reply.prompt_embeds.data) > 0
    await client.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()

    from fluxmesh.cli.supervisor import free_port

    port = free_port()
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, args.dtype, ready), daemon=True)
    server.start()
    ready.wait(30)
    try:
        samples = asyncio.run(_measure(f"127.0.0.1:{port}", args.repeats))
    finally:
        server.terminate()
    nbytes = SHAPE[0] * SHAPE[1] * SHAPE[2] * (2 if args.dtype == "bfloat16" else 4)
    t = median(samples)
    print(f"512x4096 {args.dtype} ({nbytes / 2**20:.0f} MiB) per hop over loopback, {args.repeats} calls")
    print(f"median {t * 1000:.2f} ms  ->  {nbytes / t / 1e9:.2f} GB/s  (best {nbytes / min(samples) / 1e9:.2f} GB/s; target >= 1 GB/s)")


if __name__ == "__main__":
    main()
