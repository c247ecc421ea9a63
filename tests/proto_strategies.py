"""Hypothesis strategies for any protobuf message, built from its descriptor.

Every field gets hostile values for its type: empty, huge and odd strings, negative and extreme
integers, NaN and infinite floats, enum numbers no one defined, nested messages, maps. A field
can be steered by name (`overrides`), e.g. `model` drawn from the served models so that requests
reach the task code instead of stopping at NOT_FOUND.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

# Text a tokenizer or template might choke on; LONG_TEXT runs far past every model's length limit.
ODD_TEXTS = ["", " ", "\x00", "\n\t", "[MASK]", "[CLS] [SEP] [PAD]", "<mask>", "{}", "{0} {1}", "%s%n", "\u202e\u200b",
             "😀" * 40, "a" * 3000, "ß" * 700]
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 2000

texts = st.one_of(st.text(max_size=40), st.sampled_from(ODD_TEXTS), st.just(LONG_TEXT))

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly small values (where parameter checks live), sometimes the type's extremes."""
    small = st.integers(max(low, -3), min(high, 12))
    return st.one_of(small, small, st.sampled_from(sorted({low, high, max(low, -1), min(high, 2**31 - 1)})),
                     st.integers(low, high))


floats = st.one_of(st.sampled_from([math.nan, -math.inf, math.inf, -1.0, 0.0, 1e-45, 1e30]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return texts
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return floats
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: numbers no one defined arrive as they are.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-2, 40))
    return integers(*_INT_RANGES[kind])


Overrides = Mapping[str, Callable[[FieldDescriptor], st.SearchStrategy[Any] | None]]


def messages(descriptor: Descriptor, overrides: Overrides | None = None, depth: int = 3,
             max_repeated: int = 4) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type with any subset of fields set to hostile values.

    `overrides[field_name](field)` may return a strategy for that field's value (for a repeated
    field, a list), or None to keep the default.
    """
    overrides = overrides or {}
    cls = message_factory.GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        strategy = overrides[field.name](field) if field.name in overrides else None
        if strategy is None:
            strategy = _field(field, overrides, depth, max_repeated)
        if strategy is not None:
            fields[field.name] = strategy
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, descriptor, values))


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _field(field: FieldDescriptor, overrides: Overrides, depth: int, max_repeated: int) -> st.SearchStrategy[Any] | None:
    if _is_map(field):
        key = scalar(field.message_type.fields_by_name["key"])
        value_field = field.message_type.fields_by_name["value"]
        value = _single(value_field, overrides, depth - 1, max_repeated)
        return None if value is None else st.dictionaries(key, value, max_size=max_repeated)
    single = _single(field, overrides, depth, max_repeated)
    if single is None:
        return None
    if field.is_repeated:
        return st.lists(single, max_size=max_repeated)
    return single


def _single(field: FieldDescriptor, overrides: Overrides, depth: int, max_repeated: int) -> st.SearchStrategy[Any] | None:
    if field.message_type is None:
        return scalar(field)
    if depth <= 0:
        return None
    return messages(field.message_type, overrides, depth - 1, max_repeated)


def _build(cls: type[Message], descriptor: Descriptor, values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name) if field.is_repeated else None
        if _is_map(field):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif target is not None:
            target.extend(value)
        elif field.message_type is not None:
            getattr(message, name).CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def string_field_paths(descriptor: Descriptor, depth: int = 3, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths (field names from the top) to every string field, nested messages included."""
    found = []
    for field in descriptor.fields:
        path = (*prefix, field.name)
        if field.type == FieldDescriptor.TYPE_STRING and not _is_map(field):
            found.append(path)
        elif field.message_type is not None and not _is_map(field) and depth > 0:
            found += string_field_paths(field.message_type, depth - 1, path)
    return found


def with_string(message: Message, path: tuple[str, ...], text: str) -> Message:
    """Sets the string at `path` (adding one element to repeated fields on the way)."""
    current = message
    for name in path[:-1]:
        field = current.DESCRIPTOR.fields_by_name[name]
        current = getattr(current, name).add() if field.is_repeated else getattr(current, name)
    last = current.DESCRIPTOR.fields_by_name[path[-1]]
    if last.is_repeated:
        getattr(current, path[-1]).append(text)
    else:
        setattr(current, path[-1], text)
    return message
