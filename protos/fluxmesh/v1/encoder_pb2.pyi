from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "prompts_2", "max_sequence_length", "loras")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_2_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompts_2: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraWeight]
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., prompts_2: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraWeight, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds", "truncated_tokens")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    truncated_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., truncated_tokens: _Optional[_Iterable[int]] = ...) -> None: ...
