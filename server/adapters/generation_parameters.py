"""The generation tasks' parameter messages (GenerationParameters, Seq2SeqGenerationParameters) as
the task parameters they stand for, by transformers' names.

Typed fields carry the common parameters; `extra` (a protobuf Struct) carries any other by name.
This module only turns the message into a dict: every value is checked by the task
(tasks/generation_params.py), which refuses an unknown or unservable name, naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from pipeserve.server.errors import InvalidArgument

# Fields a message handles itself (and leaves out of the generic reading).
_SPECIAL = ("extra", "stop_sequences", "logprobs", "top_logprobs")


def message_parameters(message: Any, field: str = "parameters") -> dict[str, Any]:
    """The parameters a message sets: its typed fields (unset optional ones and empty repeated
    ones left out), then `extra`'s entries."""
    params: dict[str, Any] = {}
    for descriptor in message.DESCRIPTOR.fields:
        name = descriptor.name
        if name in _SPECIAL:
            continue
        value = getattr(message, name)
        if descriptor.message_type is not None and descriptor.message_type.full_name.startswith("google.protobuf."):
            if message.HasField(name):
                params[name] = _json_of(value, f"{field}.{name}")
        elif _is_repeated(descriptor):
            if len(value):
                params[name] = [list(item.ids) for item in value] if descriptor.message_type is not None else \
                    list(value)
        elif message.HasField(name):
            params[name] = _float32(value) if descriptor.type == FieldDescriptor.TYPE_FLOAT else value
    if "extra" in message.DESCRIPTOR.fields_by_name and message.HasField("extra"):
        for key, value in _json_of(message.extra, f"{field}.extra").items():
            if key in params:
                raise InvalidArgument(f"{field}.extra.{key}", f"is also set in {field}.{key}; set it once")
            params[key] = value
    return params


def struct_value(value: Any, field: str = "parameters") -> Any:
    """A Struct / ListValue / Value message as plain JSON values (whole numbers as ints)."""
    return _json_of(value, field)


def _json_of(value: Any, field: str) -> Any:
    """A google.protobuf JSON message's values; what JSON cannot hold (NaN, infinities) is the
    sender's mistake, named."""
    try:
        return plain_json(json_format.MessageToDict(value))
    except ValueError as exc:
        raise InvalidArgument(field, f"holds a value JSON cannot carry ({exc}); send finite numbers") from None


def plain_json(value: Any) -> Any:
    """JSON as a protobuf Struct holds it, numbers as the sender wrote them: a Struct has doubles
    only, so 3.0 is read as the integer 3 (token ids, sizes; a float parameter takes an int)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


def _float32(value: float) -> float:
    """A float field's value as the decimal the client wrote: float32 0.7 is 0.699999988, which
    would scale logits differently from transformers' 0.7; the shortest decimal that reads back
    as the same float32 is what the client meant."""
    return float(str(np.float32(value)))


def _is_repeated(descriptor: FieldDescriptor) -> bool:
    return descriptor.is_repeated
