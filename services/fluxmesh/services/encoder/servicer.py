"""TextEncoder service: protobuf in, `TextEncoderEngine` call, protobuf out."""

from __future__ import annotations

from typing import Any

from fluxmesh import contract
from fluxmesh.contract import Stage
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.rpc.images import open_image
from fluxmesh.services.encoder.engine import TextEncoderEngine
from fluxmesh.services.encoder.ip_adapter import ip_adapter_image_from_pb
from fluxmesh.services.encoder.redux import ImagePrompt
from fluxmesh.services.runtime.servicer import StageServicer
from fluxmesh.services.runtime.tensors import to_pb
from fluxmesh.v1 import encoder_pb2, encoder_pb2_grpc


class TextEncoderServicer(StageServicer, encoder_pb2_grpc.TextEncoderServicer):
    stage = Stage.encoder
    engine: TextEncoderEngine

    async def Encode(self, request: encoder_pb2.EncodeRequest, context) -> encoder_pb2.EncodeResponse:
        contract.check_prompt_count(len(request.prompts))  # counted before anything is copied
        prompts, prompts_2 = list(request.prompts), list(request.prompts_2)
        images = _image_prompts(request)
        length = self.engine.check(prompts, prompts_2, request.max_sequence_length, images)
        ip_adapter_image = ip_adapter_image_from_pb(request)
        self.engine.check_ip_adapter_image(ip_adapter_image)
        loras = self.engine.loras.check(contract.check_loras(request.loras))
        self.requests += 1
        result = await self.worker.run(
            self.engine.encode, prompts, prompts_2, length, loras, images, request.zero_text, ip_adapter_image
        )
        response = encoder_pb2.EncodeResponse(
            prompt_embeds=to_pb(result.prompt_embeds),
            pooled_prompt_embeds=to_pb(result.pooled_prompt_embeds),
            truncated_tokens=result.truncated_tokens,
        )
        if result.ip_adapter_image_embeds is not None:
            response.ip_adapter_image_embeds.CopyFrom(to_pb(result.ip_adapter_image_embeds))
        return response

    async def info_facts(self) -> dict[str, Any]:
        return {
            "max_sequence_length": self.engine.default_max_sequence_length,
            "identity": self.engine.identity(),  # the orchestrator's prompt cache keys by it
            "redux": self.engine.redux is not None,  # FLUX.1-Redux image prompts (--redux)
            # IP-Adapter image prompts (--ip-adapter-image-encoder): the width of the embeds it makes
            "ip_adapter_embed_dim": self.engine.ip_adapter.embed_dim if self.engine.ip_adapter else 0,
        }


def _image_prompts(request: encoder_pb2.EncodeRequest) -> list[ImagePrompt]:
    if request.zero_text and not request.image_prompts:
        raise InvalidArgument("zero_text", "applies only with image_prompts")
    if request.zero_text and (any(request.prompts) or any(request.prompts_2)):
        raise InvalidArgument("zero_text", "zero text embeddings with a non-empty prompt")
    # RGB, as the prior pipeline's SigLIP processor converts (do_convert_rgb)
    return [
        ImagePrompt(open_image(p.image, f"image_prompts[{i}].image").convert("RGB"), p.scale, p.pooled_scale)
        for i, p in enumerate(request.image_prompts)
    ]
