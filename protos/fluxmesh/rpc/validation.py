"""Checks every request message gets, whatever its type."""

from __future__ import annotations

import functools

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from fluxmesh.rpc.errors import InvalidArgument


def check_enums(message: Message, prefix: str = "") -> None:
    """Reject enum values the proto does not define (proto3 parses them as plain numbers), naming
    the field: a newer client's value must not be silently read as the default."""
    for field in _enum_bearing_fields(message.DESCRIPTOR):  # not ListFields: it copies every bytes field
        if not field.is_repeated and field.has_presence and not message.HasField(field.name):
            continue  # an unset message is not walked (reading it would build an empty one)
        value = getattr(message, field.name)
        name = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_ENUM:
            values = value if _repeated(field) else [value]
            for i, number in enumerate(values):
                if field.enum_type.values_by_number.get(number) is None:
                    where = f"{name}[{i}]" if _repeated(field) else name
                    known = ", ".join(v.name for v in field.enum_type.values)
                    raise InvalidArgument(
                        where, f"unknown {field.enum_type.name} value {number}; expected one of {known}"
                    )
        elif not _is_map(field):
            if _repeated(field):
                for i, item in enumerate(value):
                    check_enums(item, f"{name}[{i}].")
            else:
                check_enums(value, f"{name}.")


@functools.cache
def _enum_bearing_fields(message_type: Descriptor) -> tuple[FieldDescriptor, ...]:
    """The fields of this type that are enums or messages that can hold one. Only those are
    read: walking a million LoraWeight entries in Python held the event loop for seconds, and
    reading a bytes field copies it (an init image: 32 MiB), both for nothing."""
    return tuple(
        f
        for f in message_type.fields
        if f.type == FieldDescriptor.TYPE_ENUM
        or (f.type == FieldDescriptor.TYPE_MESSAGE and _has_enums(f.message_type))
    )


@functools.cache
def _has_enums(message_type: Descriptor, _seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can hold an enum value anywhere inside it."""
    if message_type.full_name in _seen:  # a recursive type: its enums are found on the first visit
        return False
    seen = _seen | {message_type.full_name}
    return any(
        f.type == FieldDescriptor.TYPE_ENUM
        or (f.type == FieldDescriptor.TYPE_MESSAGE and _has_enums(f.message_type, seen))
        for f in message_type.fields
    )


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry
