"""What the HTTP gateway costs: the same request through the gRPC SDK and through the gateway.

    python bench/gateway.py [--repeats 9] [--width 256 --height 256 --steps 8]

The `small` tiny model, four processes plus `fluxmesh serve http` on loopback. Measured
alternately in one run (the machine is noisy: medians):
* end to end: `Client.generate` (SDK -> orchestrator -> PNG) against `POST /v1/images/generations`
  with httpx, the JSON parsed and the base64 PNG decoded (what any HTTP client pays);
  target: ratio <= 1.05; and each path's time outside the orchestrator's own (`timings.total`),
  which the generation's own noise does not reach;
* time to the first partial image: the SDK's first Step carrying a fast preview against the
  first `image_generation.partial_image` event of a streamed request (`partial_images` = steps).
"""

from __future__ import annotations

import argparse
import base64
import os
import tempfile
import time
from pathlib import Path

from _common import median, tiny_model

PROMPT = "a red fox in the snow, highly detailed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import httpx

    from fluxmesh.cli.commands.serve_http import start_gateway
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client, Step

    request = {"prompt": PROMPT, "size": f"{args.width}x{args.height}", "steps": args.steps, "guidance": 3.5, "seed": 1}
    sdk_request = {
        "prompt": PROMPT,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance": 3.5,
        "seed": 1,
    }

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_model(Path(tmp) / "small")
        with (
            start_local(str(folder), port=free_port()) as cluster,
            Client(cluster.address) as client,
            httpx.Client(timeout=120) as http,
        ):
            url = start_gateway(cluster, port=free_port(), host="127.0.0.1") + "v1/images/generations"

            def sdk() -> tuple[bytes, float]:
                result = client.generate(**sdk_request)
                return result.image_data[0], result.timings.total

            def gateway() -> tuple[bytes, float]:
                reply = http.post(url, json=request)
                reply.raise_for_status()
                answer = reply.json()
                return base64.b64decode(answer["data"][0]["b64_json"]), answer["fluxmesh"]["timings"]["total"]

            def sdk_first_preview() -> float:
                started = time.perf_counter()
                stream = client.stream(**sdk_request, preview="fast", preview_every=1)
                for event in stream:
                    if isinstance(event, Step) and event.preview_data:
                        seconds = time.perf_counter() - started
                        stream.cancel()
                        return seconds
                raise RuntimeError("no preview came")

            def gateway_first_partial() -> float:
                started = time.perf_counter()
                body = {**request, "stream": True, "partial_images": args.steps}
                with http.stream("POST", url, json=body) as reply:
                    for line in reply.iter_lines():
                        if line == "event: image_generation.partial_image":
                            return time.perf_counter() - started  # leaving closes it: the gateway cancels
                raise RuntimeError("no partial image came")

            assert sdk()[0] == gateway()[0], "the gateway's PNG differs from the SDK's"
            names = ("sdk", "gateway", "sdk_outside", "gateway_outside", "sdk_ttfp", "gateway_ttfp")
            samples: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(args.repeats):
                # Alternate, and swap who goes first each round: a cancelled request may still be
                # finishing its step when the next starts, and drift on a noisy machine hits both alike.
                pairs = [
                    (("sdk", sdk), ("gateway", gateway)),
                    (("sdk_ttfp", sdk_first_preview), ("gateway_ttfp", gateway_first_partial)),
                ]
                for pair in pairs:
                    for name, fn in pair if round_ % 2 == 0 else pair[::-1]:
                        started = time.perf_counter()
                        value = fn()
                        if name.endswith("_ttfp"):
                            samples[name].append(value)
                            time.sleep(0.5)  # the cancelled request leaves the stages
                            continue
                        samples[name].append(time.perf_counter() - started)
                        # what the path adds beyond the orchestrator's own time for the request
                        samples[f"{name}_outside"].append(samples[name][-1] - value[1])

    ms = {name: median(values) * 1000 for name, values in samples.items()}
    print(f"small tiny model, {args.width}x{args.height}, {args.steps} steps, {args.repeats} runs each")
    print(f"gRPC SDK        end to end median {ms['sdk']:8.1f} ms  (min {min(samples['sdk']) * 1000:.1f})")
    print(f"HTTP gateway    end to end median {ms['gateway']:8.1f} ms  (min {min(samples['gateway']) * 1000:.1f})")
    print(f"ratio gateway / SDK: {ms['gateway'] / ms['sdk']:.3f}  (target <= 1.05)")
    print(
        f"outside the orchestrator's own time: SDK median {ms['sdk_outside']:.1f} ms, gateway median "
        f"{ms['gateway_outside']:.1f} ms  (the gateway adds {ms['gateway_outside'] - ms['sdk_outside']:.1f} ms)"
    )
    print(
        f"first preview   SDK median {ms['sdk_ttfp']:7.1f} ms, gateway first partial image median "
        f"{ms['gateway_ttfp']:7.1f} ms  ({ms['gateway_ttfp'] - ms['sdk_ttfp']:+.1f} ms)"
    )


if __name__ == "__main__":
    main()
