"""Generation parameters shared by the generation tasks: checking them, and the model's defaults."""

from __future__ import annotations

from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskContext, check_float, check_int

# What `generate()` uses for a parameter that neither the call nor the model's generation config
# sets (transformers' documented defaults).
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "num_beams": 1,
    "no_repeat_ngram_size": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "num_return_sequences": 1,
}

SEED_MAX = 2**64 - 1
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256


def model_generation_config(context: TaskContext) -> Any:
    """The model's GenerationConfig: generation_config.json, else one derived from its config."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(context.source, **context.pretrained_kwargs)
    except (OSError, ValueError):
        if context.hf_config is not None:
            return GenerationConfig.from_model_config(context.hf_config)
        return GenerationConfig()


def model_set_parameters(generation_config: Any) -> dict[str, Any]:
    """The generation parameters the model's generation config sets (differs from the defaults)."""
    params = generation_config.to_diff_dict()
    params.pop("transformers_version", None)
    return params


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, f"must be true or false, got {value!r}")
    return value


def check_seed(value: Any) -> int:
    return check_int("seed", value, 0, SEED_MAX)


def check_sampling(params: dict[str, Any]) -> dict[str, Any]:
    """Checks the sampling parameters present in `params`; returns them with their checked values."""
    checked: dict[str, Any] = {}
    if params.get("do_sample") is not None:
        checked["do_sample"] = check_bool("do_sample", params["do_sample"])
    if params.get("temperature") is not None:
        checked["temperature"] = check_float("temperature", params["temperature"], 0.0, 100.0, low_open=True)
    if params.get("top_k") is not None:
        checked["top_k"] = check_int("top_k", params["top_k"], 0)
    if params.get("top_p") is not None:
        checked["top_p"] = check_float("top_p", params["top_p"], 0.0, 1.0, low_open=True)
    if params.get("repetition_penalty") is not None:
        checked["repetition_penalty"] = check_float("repetition_penalty", params["repetition_penalty"], 0.0, 100.0,
                                                    low_open=True)
    if params.get("seed") is not None:
        checked["seed"] = check_seed(params["seed"])
    return checked


def check_stop_sequences(value: Any) -> tuple[str, ...]:
    """A string or a list of strings (transformers' `stop_sequence`), each non-empty."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise InvalidArgument("stop_sequences", "must be a list of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidArgument("stop_sequences", f"has {len(value)} entries; at most {MAX_STOP_SEQUENCES}")
    for i, stop in enumerate(value):
        if not stop:
            raise InvalidArgument(f"stop_sequences[{i}]", "must not be empty")
        if len(stop) > MAX_STOP_SEQUENCE_CHARS:
            raise InvalidArgument(f"stop_sequences[{i}]",
                                  f"is {len(stop)} characters; at most {MAX_STOP_SEQUENCE_CHARS}")
    return tuple(value)


def eos_token_ids(generation_config: Any, hf_config: Any) -> tuple[int, ...]:
    eos = generation_config.eos_token_id
    if eos is None and hf_config is not None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
