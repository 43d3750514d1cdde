"""TextEncoder service: protobuf in, `TextEncoderEngine` call, protobuf out."""

from __future__ import annotations

from fluxmesh.services.encoder.engine import TextEncoderEngine
from fluxmesh.services.runtime.info import stage_info
from fluxmesh.services.residency.state import residency_state
from fluxmesh.services.runtime.tensors import to_pb
from fluxmesh.services.runtime.worker import ModelWorker
from fluxmesh.v1 import encoder_pb2, encoder_pb2_grpc, common_pb2


class TextEncoderServicer(encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, engine: TextEncoderEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.requests = 0  # accepted requests, reported by Info
        self.worker = ModelWorker("encoder")

    async def Encode(self, request: encoder_pb2.EncodeRequest, context) -> encoder_pb2.EncodeResponse:
        prompts, prompts_2 = list(request.prompts), list(request.prompts_2)
        length = self.engine.check(prompts, prompts_2, request.max_sequence_length)
        loras = self.engine.loras.check([(lora.name, lora.weight) for lora in request.loras])
        self.requests += 1
        result = await self.worker.run(self.engine.encode, prompts, prompts_2, length, loras)
        return encoder_pb2.EncodeResponse(
            prompt_embeds=to_pb(result.prompt_embeds),
            pooled_prompt_embeds=to_pb(result.pooled_prompt_embeds),
            truncated_tokens=result.truncated_tokens,
        )

    async def Info(self, request, context) -> common_pb2.StageInfo:
        return stage_info(
            "encoder",
            self.model_name,
            self.engine.device,
            self.engine.weight_bytes(),
            residency=residency_state(self.engine),
            max_sequence_length=self.engine.default_max_sequence_length,
            identity=self.engine.identity(),  # the orchestrator's prompt cache keys by it
            requests=self.requests,
        )
