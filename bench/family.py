"""What each FLUX.1 family addition costs per denoising step, against plain text to image.

    python bench/family.py [--repeats 5] [--size 256] [--steps 8] [--threads 2]

The `small` tiny models (base, Kontext, Control; written once into a temp folder), the denoiser
engine in this process (the stage's own code, no gRPC), per-step seconds from its step callback,
the modes measured alternately (medians: the machine is noisy):

* plain: FluxPipeline, 512 T5 tokens.
* redux: the prompt embeddings FluxPriorReduxPipeline makes on the small Redux folder (512 + 64
  image tokens), and the same with FLUX.1-Redux's real 729 image tokens (SigLIP at 384 px): the
  denoiser's cost depends only on that length.
* kontext: FluxKontextPipeline with a reference as large as the output (image tokens doubled).
* control: FluxControlPipeline (in_channels 128: the control latents concatenated).
* ip-adapter: FluxPipeline with XLabs' IP-Adapter (tiny-model --variant ip-adapter at this size):
  its processors add a 4-token attention per double block, and the request runs the pipeline's
  own loop (never batched).
* controlnet: FluxControlNetPipeline with an InstantX-layout ControlNet (its share of the
  transformer's blocks as the real one's, about a quarter), and two of them
  (FluxMultiControlNetModel): one more forward each, every step.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import median, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="output width = height")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from fluxmesh.services.denoiser.controlnet import ControlNetImage
    from fluxmesh.services.denoiser.engine import DenoiseJob, DenoiserEngine
    from fluxmesh.services.denoiser.family import Conditioning
    from fluxmesh.services.denoiser.ip_adapter import IpAdapterInput
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.encoder.ip_adapter import IpAdapterImage
    from fluxmesh.services.encoder.redux import ImagePrompt
    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.tools.tiny_ip_adapter import write_tiny_ip_adapter
    from fluxmesh.services.tools.tiny_model import write_tiny_redux
    from fluxmesh.services.vae.encoding import ImageEncoder
    from fluxmesh.services.vae.engine import VaeEngine

    torch.set_num_threads(args.threads)
    device = Device.parse("cpu", "float32")
    size = args.size
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        base = tiny_model(Path(tmp) / "small")
        kontext = tiny_model(Path(tmp) / "kontext", variant="kontext")
        control = tiny_model(Path(tmp) / "control", variant="control")
        redux = write_tiny_redux(Path(tmp) / "redux", size="small")
        xlabs = write_tiny_ip_adapter(Path(tmp) / "xlabs", size="small")
        controlnet = tiny_model(Path(tmp) / "controlnet", variant="controlnet")

        encoder = TextEncoderEngine(base, device, redux=redux, ip_adapter_image_encoder=xlabs / "image_encoder")
        text = encoder.encode(["a red fox in the snow"], [], 512)
        image_prompt = encoder.encode(["a red fox in the snow"], [], 512, (), [ImagePrompt(photo, 1.0, 1.0)])
        redux_729 = torch.cat([text.prompt_embeds, torch.zeros(1, 729, text.prompt_embeds.shape[-1])], dim=1)
        engines = {
            name: DenoiserEngine(folder, device)
            for name, folder in (("base", base), ("kontext", kontext), ("control", control))
        }
        engines["ip-adapter"] = DenoiserEngine(base, device, ip_adapter=xlabs / "ip_adapter.safetensors")
        image_embeds = encoder.ip_adapter.embed(IpAdapterImage(photo))
        engines["controlnet"] = DenoiserEngine(base, device, controlnets=[controlnet, controlnet])
        vae = ImageEncoder(VaeEngine(base, device))
        encoded = vae.encode(photo, None, size, size)
        nets = tuple(ControlNetImage(i, encoded.posterior, None, 0, 1.0, 0.0, 1.0) for i in range(2))
        modes = {
            "plain": ("base", text.prompt_embeds, None),
            f"redux ({image_prompt.prompt_embeds.shape[1] - 512} image tokens)": (
                "base",
                image_prompt.prompt_embeds,
                None,
            ),
            "redux (729 image tokens, as FLUX.1-Redux)": ("base", redux_729, None),
            "kontext (reference as large as the output)": (
                "kontext",
                text.prompt_embeds,
                Conditioning(kontext_latents=encoded.latents),
            ),
            "control": ("control", text.prompt_embeds, Conditioning(control_posterior=encoded.posterior)),
            "ip-adapter (XLabs, scale 1)": ("ip-adapter", text.prompt_embeds, IpAdapterInput(image_embeds, None, 1.0)),
            "controlnet (InstantX layout)": ("controlnet", text.prompt_embeds, Conditioning(controlnets=nets[:1])),
            "two controlnets (FluxMultiControlNetModel)": (
                "controlnet",
                text.prompt_embeds,
                Conditioning(controlnets=nets),
            ),
        }

        def run(name: str) -> list[float]:
            engine_name, embeds, extra = modes[name]
            engine = engines[engine_name]
            inputs = {"ip_adapter": extra} if isinstance(extra, IpAdapterInput) else {"conditioning": extra}
            job = DenoiseJob(embeds, text.pooled_prompt_embeds, size, size, args.steps, 3.5, 1, 1, **inputs)
            engine.check(job)
            seconds: list[float] = []
            engine.denoise(job, on_step=lambda step, total, s, preview: seconds.append(s))
            return seconds[1:]  # the first step also holds the pipeline's set-up

        for name in modes:  # warm every path
            run(name)
        samples: dict[str, list[float]] = {name: [] for name in modes}
        for _ in range(args.repeats):  # alternate so drift on a noisy machine hits all alike
            for name in modes:
                samples[name] += run(name)
    plain = median(samples["plain"])
    print(
        f"small tiny models, {size}x{size}, {args.steps} steps x {args.repeats} runs per mode, "
        f"{args.threads} torch threads, denoiser in process; median seconds per step (first step of each run left out)"
    )
    for name, values in samples.items():
        step = median(values)
        print(f"{name:44s}: {1000 * step:8.1f} ms per step, ratio to plain {step / plain:.2f}")


if __name__ == "__main__":
    main()
