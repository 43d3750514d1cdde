from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenoiseRequest(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds", "width", "height", "steps", "guidance", "seed", "num_images", "loras", "init", "preview", "negative_prompt_embeds", "negative_pooled_prompt_embeds", "true_cfg_scale", "cache", "conditioning", "ip_adapter")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    CONDITIONING_FIELD_NUMBER: _ClassVar[int]
    IP_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraWeight]
    init: InitImage
    preview: PreviewOptions
    negative_prompt_embeds: _common_pb2.Tensor
    negative_pooled_prompt_embeds: _common_pb2.Tensor
    true_cfg_scale: float
    cache: _common_pb2.StepCache
    conditioning: Conditioning
    ip_adapter: IpAdapter
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraWeight, _Mapping]]] = ..., init: _Optional[_Union[InitImage, _Mapping]] = ..., preview: _Optional[_Union[PreviewOptions, _Mapping]] = ..., negative_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., negative_pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., true_cfg_scale: _Optional[float] = ..., cache: _Optional[_Union[_common_pb2.StepCache, _Mapping]] = ..., conditioning: _Optional[_Union[Conditioning, _Mapping]] = ..., ip_adapter: _Optional[_Union[IpAdapter, _Mapping]] = ...) -> None: ...

class IpAdapter(_message.Message):
    __slots__ = ("image_embeds", "negative_image_embeds", "scale")
    IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    image_embeds: _common_pb2.Tensor
    negative_image_embeds: _common_pb2.Tensor
    scale: float
    def __init__(self, image_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., negative_image_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class Conditioning(_message.Message):
    __slots__ = ("kontext_latents", "control_posterior", "controlnets")
    KONTEXT_LATENTS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    kontext_latents: _common_pb2.Tensor
    control_posterior: _common_pb2.Tensor
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetImage]
    def __init__(self, kontext_latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., control_posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetImage, _Mapping]]] = ...) -> None: ...

class ControlNetImage(_message.Message):
    __slots__ = ("controlnet", "posterior", "pixels", "mode", "scale", "start", "end")
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    controlnet: int
    posterior: _common_pb2.Tensor
    pixels: _common_pb2.Tensor
    mode: int
    scale: float
    start: float
    end: float
    def __init__(self, controlnet: _Optional[int] = ..., posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pixels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mode: _Optional[int] = ..., scale: _Optional[float] = ..., start: _Optional[float] = ..., end: _Optional[float] = ...) -> None: ...

class InitImage(_message.Message):
    __slots__ = ("posterior", "strength", "masked_posterior", "mask")
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    MASKED_POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    posterior: _common_pb2.Tensor
    strength: float
    masked_posterior: _common_pb2.Tensor
    mask: _common_pb2.Tensor
    def __init__(self, posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., strength: _Optional[float] = ..., masked_posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PreviewOptions(_message.Message):
    __slots__ = ("every", "fast", "x0", "latent_rgb")
    EVERY_FIELD_NUMBER: _ClassVar[int]
    FAST_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    LATENT_RGB_FIELD_NUMBER: _ClassVar[int]
    every: int
    fast: bool
    x0: bool
    latent_rgb: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, every: _Optional[int] = ..., fast: _Optional[bool] = ..., x0: _Optional[bool] = ..., latent_rgb: _Optional[_Iterable[float]] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("step", "total", "seconds", "previews", "x0")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    X0_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    seconds: float
    previews: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    x0: _common_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., seconds: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., x0: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DenoiseEvent(_message.Message):
    __slots__ = ("step", "latents", "step_cache")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_FIELD_NUMBER: _ClassVar[int]
    step: StepEvent
    latents: _common_pb2.Tensor
    step_cache: _common_pb2.StepCacheReport
    def __init__(self, step: _Optional[_Union[StepEvent, _Mapping]] = ..., latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., step_cache: _Optional[_Union[_common_pb2.StepCacheReport, _Mapping]] = ...) -> None: ...
