from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DecodeRequest(_message.Message):
    __slots__ = ("latents", "width", "height", "format", "preview")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    width: int
    height: int
    format: _common_pb2.ImageFormat
    preview: bool
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., preview: _Optional[bool] = ...) -> None: ...

class EncodeImageRequest(_message.Message):
    __slots__ = ("image", "mask", "width", "height", "fill", "preprocess", "pixels")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    mask: bytes
    width: int
    height: int
    fill: bool
    preprocess: _common_pb2.ControlPreprocess
    pixels: bool
    def __init__(self, image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., fill: _Optional[bool] = ..., preprocess: _Optional[_Union[_common_pb2.ControlPreprocess, str]] = ..., pixels: _Optional[bool] = ...) -> None: ...

class EncodeImageResponse(_message.Message):
    __slots__ = ("latents", "posterior", "masked_posterior", "mask", "scaling_factor", "shift_factor", "pixels")
    LATENTS_FIELD_NUMBER: _ClassVar[int]
    POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    MASKED_POSTERIOR_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    SCALING_FACTOR_FIELD_NUMBER: _ClassVar[int]
    SHIFT_FACTOR_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    latents: _common_pb2.Tensor
    posterior: _common_pb2.Tensor
    masked_posterior: _common_pb2.Tensor
    mask: _common_pb2.Tensor
    scaling_factor: float
    shift_factor: float
    pixels: _common_pb2.Tensor
    def __init__(self, latents: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., masked_posterior: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., scaling_factor: _Optional[float] = ..., shift_factor: _Optional[float] = ..., pixels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ...) -> None: ...
