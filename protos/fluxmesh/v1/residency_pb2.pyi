from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReleaseTo(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_TO_UNSPECIFIED: _ClassVar[ReleaseTo]
    RELEASE_TO_AUTO: _ClassVar[ReleaseTo]
    RELEASE_TO_CPU: _ClassVar[ReleaseTo]
    RELEASE_TO_DISK: _ClassVar[ReleaseTo]
RELEASE_TO_UNSPECIFIED: ReleaseTo
RELEASE_TO_AUTO: ReleaseTo
RELEASE_TO_CPU: ReleaseTo
RELEASE_TO_DISK: ReleaseTo

class LoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("keep_in_cpu_memory", "release_to")
    KEEP_IN_CPU_MEMORY_FIELD_NUMBER: _ClassVar[int]
    RELEASE_TO_FIELD_NUMBER: _ClassVar[int]
    keep_in_cpu_memory: bool
    release_to: ReleaseTo
    def __init__(self, keep_in_cpu_memory: _Optional[bool] = ..., release_to: _Optional[_Union[ReleaseTo, str]] = ...) -> None: ...

class ResidencyStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResidencyTransition(_message.Message):
    __slots__ = ("from_state", "to_state", "started_unix", "finished_unix")
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    from_state: str
    to_state: str
    started_unix: float
    finished_unix: float
    def __init__(self, from_state: _Optional[str] = ..., to_state: _Optional[str] = ..., started_unix: _Optional[float] = ..., finished_unix: _Optional[float] = ...) -> None: ...

class ResidencyStatus(_message.Message):
    __slots__ = ("stage", "state", "device", "weight_bytes", "device_weight_bytes", "rss_bytes", "device_allocated_bytes", "seconds", "transitions")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    state: str
    device: str
    weight_bytes: int
    device_weight_bytes: int
    rss_bytes: int
    device_allocated_bytes: int
    seconds: float
    transitions: _containers.RepeatedCompositeFieldContainer[ResidencyTransition]
    def __init__(self, stage: _Optional[str] = ..., state: _Optional[str] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., device_weight_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., device_allocated_bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., transitions: _Optional[_Iterable[_Union[ResidencyTransition, _Mapping]]] = ...) -> None: ...
