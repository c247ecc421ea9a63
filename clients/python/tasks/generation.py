"""What the generation tasks' codecs share: call parameters as a parameters message (typed fields
by name, the rest in its `extra` object), and what cannot cross a wire refused here."""

from __future__ import annotations

import enum
from typing import Any

from google.protobuf import json_format

# Parameters transformers takes as Python objects: a TypeError naming them and why, before any call.
REFUSED = {
    "logits_processor": "is Python code, which cannot cross the wire to the server",
    "stopping_criteria": "is Python code, which cannot cross the wire to the server; stop_sequence, "
                         "max_new_tokens and max_time are served",
    "prefix_allowed_tokens_fn": "is Python code, which cannot cross the wire to the server",
    "streamer": "is a Python object, which cannot cross the wire; use the pipeline's .stream() instead",
    "assistant_model": "is a model, which cannot cross the wire; prompt_lookup_num_tokens speeds up decoding "
                       "without one",
    "assistant_tokenizer": "belongs to assisted generation with an assistant model, which cannot cross the wire",
    "tokenizer": "is a Python object; the server uses the model's own tokenizer",
}


def json_value(name: str, value: Any) -> Any:
    """A parameter value as plain JSON (tensors and arrays as lists, enums by value); anything
    else cannot cross the wire: TypeError naming the parameter."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value.value, (int, str)) else value.name.lower()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if hasattr(value, "to_dict") and callable(value.to_dict):  # transformers' config objects (WatermarkingConfig)
        return json_value(name, value.to_dict())
    if isinstance(value, dict):
        if name.endswith("sequence_bias") and any(isinstance(k, tuple) for k in value):
            return [[list(k), json_value(name, v)] for k, v in value.items()]  # transformers' list form
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"parameter {name!r} has keys that are not strings, which JSON cannot carry")
        return {k: json_value(f"{name}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if callable(value):
        raise TypeError(f"parameter {name!r} is a {type(value).__name__}: Python code cannot cross the wire to "
                        "the server")
    raise TypeError(f"parameter {name!r} is a {type(value).__name__}, which cannot cross the wire: send plain "
                    "values (numbers, strings, lists, dicts)")


def generation_config(value: Any) -> Any:
    """A transformers GenerationConfig as the parameters it sets (its to_diff_dict)."""
    if hasattr(value, "to_diff_dict"):
        value = dict(value.to_diff_dict())
        value.pop("transformers_version", None)
    return value


def tools(value: Any) -> Any:
    """Tools as JSON schemas; Python functions are described as transformers describes them."""
    if not isinstance(value, (list, tuple)):
        return value
    out = []
    for tool in value:
        if callable(tool):
            try:
                from transformers.utils import get_json_schema
            except ImportError:
                raise TypeError("a tool that is a Python function needs transformers installed to describe it "
                                "(transformers.utils.get_json_schema); or pass its JSON schema") from None
            tool = get_json_schema(tool)
        out.append(tool)
    return out


def proto_parameters(message: Any, params: dict[str, Any], task: str) -> Any:
    """Fills a parameters message: each parameter in its own field where it has one and the value
    fits it, else in `extra` for the server to check."""
    extra: dict[str, Any] = {}
    fields = message.DESCRIPTOR.fields_by_name
    for name, value in params.items():
        if value is None:
            continue
        if name in REFUSED:
            if value in ([], ()):
                continue
            raise TypeError(f"{task} parameter {name!r} {REFUSED[name]}")
        if name == "generation_config":
            value = generation_config(value)
        if name == "tools":
            value = tools(value)
        value = json_value(name, value)
        field = fields.get(name)
        if field is None or name == "extra" or not _set(message, field, value):
            extra[name] = value
    if extra:
        json_format.ParseDict(extra, message.extra)
    return message


def _set(message: Any, field: Any, value: Any) -> bool:
    """Puts a value in its field; False when it does not fit (it then goes in `extra`, and the
    server says what is wrong with it)."""
    target = getattr(message, field.name)
    try:
        if field.message_type is not None and field.message_type.full_name.startswith("google.protobuf."):
            json_format.ParseDict(value, target)
        elif field.is_repeated:
            if not isinstance(value, list):
                if field.message_type is not None or isinstance(value, dict):
                    return False
                value = [value]  # eos_token_id=2, stop_sequence="." as the one-item lists they mean
            if field.message_type is not None:  # TokenIds
                if not all(isinstance(ids, list) for ids in value):
                    return False
                for ids in value:
                    target.add(ids=ids)
            else:
                target.extend(value)
        else:
            if isinstance(value, bool) != (field.type == field.TYPE_BOOL):
                return False
            setattr(message, field.name, value)
    except (TypeError, ValueError, json_format.ParseError):
        message.ClearField(field.name)
        return False
    return True
