"""Checkers of generation parameters: (field, value) -> the checked value, or INVALID_ARGUMENT
naming the field and what is allowed. The tables of generation_params.py name one per parameter."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import check_float, check_int

SEED_MAX = 2**64 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_BEAMS = 32
MAX_TOKEN_LISTS = 4096
MAX_TOKENS_PER_LIST = 256


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, f"must be true or false, got {value!r}")
    return value


def check_seed(value: Any) -> int:
    return check_int("seed", value, 0, SEED_MAX)


def whole_number(field: str, value: Any) -> Any:
    """JSON numbers arrive as floats from a protobuf Struct: 3.0 is the integer 3."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def int_in(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    return lambda field, value: check_int(field, whole_number(field, value), low, high)


def float_in(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str, Any], float]:
    return lambda field, value: check_float(field, value, low, high, low_open)


def positive(field: str, value: Any) -> float:
    return check_float(field, value, 0.0, None, low_open=True)


def finite(field: str, value: Any) -> float:
    return check_float(field, value, -1e6, 1e6)


def token_id(field: str, value: Any) -> int:
    return check_int(field, whole_number(field, value), 0)


def token_ids(field: str, value: Any, *, empty: bool = True) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument(field, f"must be a list of token ids, got {value!r}")
    if not empty and not value:
        raise InvalidArgument(field, "must not be empty")
    if len(value) > MAX_TOKENS_PER_LIST * 16:
        raise InvalidArgument(field, f"has {len(value)} token ids; at most {MAX_TOKENS_PER_LIST * 16}")
    return tuple(token_id(f"{field}[{i}]", v) for i, v in enumerate(value))


def token_id_or_ids(field: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return token_ids(field, value, empty=False)
    return token_id(field, value)


def token_id_lists(field: str, value: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidArgument(field, f"must be a non-empty list of token id lists, got {value!r}")
    if len(value) > MAX_TOKEN_LISTS:
        raise InvalidArgument(field, f"has {len(value)} entries; at most {MAX_TOKEN_LISTS}")
    return tuple(token_ids(f"{field}[{i}]", ids, empty=False) for i, ids in enumerate(value))


def sequence_bias_pairs(field: str, value: Any) -> tuple[tuple[tuple[int, ...], float], ...]:
    """transformers' list form: [[token ids, bias], ...] (a JSON object cannot have tuple keys)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidArgument(field, f"must be a non-empty list of [token ids, bias] pairs, got {value!r}")
    if len(value) > MAX_TOKEN_LISTS:
        raise InvalidArgument(field, f"has {len(value)} entries; at most {MAX_TOKEN_LISTS}")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidArgument(f"{field}[{i}]", f"must be a [token ids, bias] pair, got {pair!r}")
        pairs.append((token_ids(f"{field}[{i}][0]", pair[0], empty=False), finite(f"{field}[{i}][1]", pair[1])))
    return tuple(pairs)


def early_stopping(field: str, value: Any) -> bool | str:
    if value == "never" or isinstance(value, bool):
        return value
    raise InvalidArgument(field, f"must be true, false or \"never\", got {value!r}")


def decay(field: str, value: Any) -> tuple[int, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidArgument(field, f"must be a [start_index, decay_factor] pair, got {value!r}")
    return int_in(0)(f"{field}[0]", value[0]), check_float(f"{field}[1]", value[1], 1.0, 100.0)


def check_stop_strings(field: str, value: Any) -> tuple[str, ...]:
    """A string or a list of strings, each non-empty."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidArgument(field, "must be a string or a list of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidArgument(field, f"has {len(value)} entries; at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(value):
        if not stop:
            raise InvalidArgument(f"{field}[{i}]", "must not be empty")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(f"{field}[{i}]", f"is {len(stop)} characters; at most {MAX_STOP_SEQUENCE_CHARS}")
    return tuple(value)


def check_stop_sequences(value: Any) -> tuple[str, ...]:
    return check_stop_strings("stop_sequences", value)


def json_object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(field, f"must be an object, got {value!r}")
    return dict(value)
