"""Checks every request message gets, whatever its type."""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from fluxmesh.rpc.errors import InvalidArgument


def check_enums(message: Message, prefix: str = "") -> None:
    """Reject enum values the proto does not define (proto3 parses them as plain numbers), naming
    the field: a newer client's value must not be silently read as the default."""
    for field, value in message.ListFields():
        name = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_ENUM:
            values = value if _repeated(field) else [value]
            for i, number in enumerate(values):
                if field.enum_type.values_by_number.get(number) is None:
                    where = f"{name}[{i}]" if _repeated(field) else name
                    known = ", ".join(v.name for v in field.enum_type.values)
                    raise InvalidArgument(where, f"unknown {field.enum_type.name} value {number}; expected one of {known}")
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not _is_map(field):
            if _repeated(field):
                for i, item in enumerate(value):
                    check_enums(item, f"{name}[{i}].")
            else:
                check_enums(value, f"{name}.")


def _repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry
