from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds", "width", "height", "steps", "guidance", "seed", "num_images", "loras")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraWeight]
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraWeight, _Mapping]]] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("step", "total", "seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    seconds: float
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("step", "latents")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    step: StepEvent
    latents: _common_pb2.Tensor
    def __init__(self, step: _Optional[_Union[StepEvent, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
