"""Generation parameters shared by the generation tasks: which ones are served, checking them, and
how unset ones resolve.

Every keyword argument that transformers' `generate()` takes (its own and every `GenerationConfig`
field) is in exactly one of three tables here, so that a parameter a future transformers adds is
noticed (tests/test_generation_parameters.py reads transformers' signatures against them):

- `GENERATE_PARAMETERS`: served; the value is checked (type and range, the error naming the
  parameter) and passed on. Which of them the continuous batching engine runs is
  `ENGINE_PARAMETERS`; a text-generation request that needs any other runs as whole sequences.
- `NO_EFFECT`: accepted and dropped: they choose how the model runs (its cache, compilation), never
  what it writes, and the server decides that itself.
- `REFUSED`: INVALID_ARGUMENT with the reason, unless set to the value that changes nothing (None,
  False, the default), which is accepted: what cannot cross a wire (callables, models, streamers)
  and what transformers 5 itself no longer runs without code from the Hub.

The pipelines' own parameters (return_full_text, prefix, truncation, ...) are the tasks'.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskContext
from pipeserve.server.tasks.generation_checks import (
    MAX_BEAMS,
    check_bool,
    check_stop_strings,
    decay,
    early_stopping,
    finite,
    float_in,
    int_in,
    json_object,
    positive,
    sequence_bias_pairs,
    token_id,
    token_id_lists,
    token_id_or_ids,
    token_ids,
)

# What `generate()` uses for a parameter that neither the call nor the model's generation config
# sets (transformers' GenerationConfig._get_default_generation_params, the same in 4.57 and 5.x).
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_length": 20,
    "min_length": 0,
    "do_sample": False,
    "early_stopping": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
    "remove_invalid_values": False,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "encoder_repetition_penalty": 1.0,
}

# torch's default generator is process-wide and generate() samples from it: a seeded call holds
# this lock from seeding to its last draw, so that no other sampling thread moves it meanwhile.
DEFAULT_GENERATOR = threading.Lock()


# -- the tables --------------------------------------------------------------------------------

# Served generate() arguments and GenerationConfig fields, with their checkers.
GENERATE_PARAMETERS: dict[str, Callable[[str, Any], Any]] = {
    # length
    "max_length": int_in(1),
    "max_new_tokens": int_in(1),
    "min_length": int_in(0),
    "min_new_tokens": int_in(0),
    "early_stopping": early_stopping,
    "max_time": positive,
    "stop_strings": check_stop_strings,
    # strategy
    "do_sample": check_bool,
    "num_beams": int_in(1, MAX_BEAMS),
    "num_return_sequences": int_in(1),
    # logits
    "temperature": float_in(0.0, 100.0, low_open=True),
    "top_k": int_in(0),
    "top_p": float_in(0.0, 1.0, low_open=True),
    "min_p": float_in(0.0, 1.0),
    "typical_p": float_in(0.0, 1.0, low_open=True),
    "epsilon_cutoff": float_in(0.0, 1.0),
    "eta_cutoff": float_in(0.0, 1.0),
    "top_h": float_in(0.0, 1.0, low_open=True),
    "repetition_penalty": float_in(0.0, 100.0, low_open=True),
    "encoder_repetition_penalty": float_in(0.0, 100.0, low_open=True),
    "length_penalty": float_in(-100.0, 100.0),
    "no_repeat_ngram_size": int_in(0),
    "encoder_no_repeat_ngram_size": int_in(0),
    "bad_words_ids": token_id_lists,
    "sequence_bias": sequence_bias_pairs,
    "renormalize_logits": check_bool,
    "remove_invalid_values": check_bool,
    "exponential_decay_length_penalty": decay,
    "suppress_tokens": token_ids,
    "begin_suppress_tokens": token_ids,
    "forced_bos_token_id": token_id,
    "forced_eos_token_id": token_id_or_ids,
    "guidance_scale": finite,
    "negative_prompt_ids": lambda field, value: token_ids(field, value, empty=False),
    "negative_prompt_attention_mask": lambda field, value: token_ids(field, value, empty=False),
    "watermarking_config": json_object,
    "token_healing": check_bool,
    # special tokens
    "pad_token_id": token_id,
    "bos_token_id": token_id,
    "eos_token_id": token_id_or_ids,
    "decoder_start_token_id": token_id,
    # prompt lookup decoding (assisted generation that needs no assistant model)
    "prompt_lookup_num_tokens": int_in(1, 64),
    "max_matching_ngram_size": int_in(1, 64),
}

# Token ids among them, checked against the model's vocabulary.
TOKEN_PARAMETERS = ("bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens",
                    "forced_bos_token_id", "forced_eos_token_id", "pad_token_id", "bos_token_id", "eos_token_id",
                    "decoder_start_token_id", "negative_prompt_ids")

# What the continuous batching engine runs (server/generation/sampling.py, outputs.py). Any other
# served parameter set to a value that does something makes a text-generation request run as
# whole sequences (`Instance.generate`).
ENGINE_PARAMETERS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "stop_strings", "do_sample",
    "num_return_sequences", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "sequence_bias", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "pad_token_id", "bos_token_id",
    "eos_token_id", "decoder_start_token_id",
    # only beam search reads these: with one beam they change nothing
    "early_stopping", "length_penalty",
})

_RUNS_THE_MODEL = "chooses how the model runs (its cache, compilation), not what it writes: the server decides that"
# Accepted, and dropped: they change no result.
NO_EFFECT: dict[str, str] = {
    "use_cache": _RUNS_THE_MODEL,
    "cache_implementation": _RUNS_THE_MODEL,
    "cache_config": _RUNS_THE_MODEL,
    "max_cache_len": _RUNS_THE_MODEL,
    "compile_config": _RUNS_THE_MODEL,
    "disable_compile": _RUNS_THE_MODEL,
    "prefill_chunk_size": _RUNS_THE_MODEL,
    "continuous_batching_config": _RUNS_THE_MODEL,
    "synced_gpus": "is for several GPUs running one generate() together; the server places the model itself",
    "transformers_version": "is the version a generation config was saved with",
    "return_legacy_cache": _RUNS_THE_MODEL,
    "batch_size": "the server batches requests itself (dynamic batching, continuous batching)",
    "num_workers": "the server batches requests itself (dynamic batching, continuous batching)",
}

_NO_CALLABLE = "it is Python code, which cannot cross the wire"
_HUB = ("transformers 5 runs this decoding method from the Hub (custom_generate {repo}, trust_remote_code), and "
        "the server runs no code from the Hub")
_ASSISTANT = "it belongs to assisted generation with an assistant model, which cannot cross the wire"
_PER_STEP = ("it returns per-step tensors over the whole vocabulary or model; the response carries log "
             "probabilities instead (logprobs, top_logprobs)")

# Refused, with why, unless set to a value that changes nothing (the second entry: those values).
REFUSED: dict[str, tuple[str, tuple[Any, ...]]] = {
    "logits_processor": (_NO_CALLABLE, (None, [])),
    "stopping_criteria": (_NO_CALLABLE, (None, [])),
    "prefix_allowed_tokens_fn": (_NO_CALLABLE, (None,)),
    "custom_generate": ("it is Python code or code from the Hub, which the server does not run", (None,)),
    "streamer": ("it is a Python object; stream over the GenerateStream RPC (the SDK's .stream()) instead", (None,)),
    "assistant_model": ("it is a model, which cannot cross the wire; prompt_lookup_num_tokens speeds up "
                        "decoding without one", (None,)),
    "assistant_tokenizer": (_ASSISTANT, (None,)),
    "tokenizer": ("it is a Python object; the server uses the model's own tokenizer", (None,)),
    "trust_remote_code": ("it is the server's choice (config.pbtxt trust_remote_code), not a request's", (None, False)),
    "use_model_defaults": ("transformers 5 removed it; unset parameters resolve as the pipeline resolves them",
                           (None, True)),
    "num_assistant_tokens": (_ASSISTANT, (None, 20)),
    "num_assistant_tokens_schedule": (_ASSISTANT, (None, "constant")),
    "assistant_confidence_threshold": (_ASSISTANT, (None, 0.4)),
    "assistant_lookbehind": (_ASSISTANT, (None, 10)),
    "target_lookbehind": (_ASSISTANT, (None, 10)),
    "assistant_early_exit": (_ASSISTANT, (None,)),
    "assistant_ensemble_weight": (_ASSISTANT, (None,)),
    "is_assistant": (_ASSISTANT, (None, False)),
    "speculation_type": (_ASSISTANT, (None,)),
    "use_mtp": (_ASSISTANT, (None, False)),
    "penalty_alpha": (_HUB.format(repo="transformers-community/contrastive-search"), (None, 0, 0.0)),
    "dola_layers": (_HUB.format(repo="transformers-community/dola"), (None,)),
    "num_beam_groups": (_HUB.format(repo="transformers-community/group-beam-search"), (None, 1)),
    "diversity_penalty": (_HUB.format(repo="transformers-community/group-beam-search"), (None, 0, 0.0)),
    "constraints": (_HUB.format(repo="transformers-community/constrained-beam-search"), (None, [])),
    "force_words_ids": (_HUB.format(repo="transformers-community/constrained-beam-search"), (None, [])),
    "low_memory": ("transformers 5 removed low-memory beam search (generate raises on it)", (None, False)),
    "output_scores": (_PER_STEP, (None, False)),
    "output_logits": (_PER_STEP, (None, False)),
    "output_attentions": (_PER_STEP, (None, False)),
    "output_hidden_states": (_PER_STEP, (None, False)),
    "return_dict_in_generate": (_PER_STEP, (None, False)),
}

# pipeserve's own parameters of the generation tasks (not transformers').
PIPESERVE_PARAMETERS = ("seed",)


def refused_value(name: str, value: Any) -> bool:
    """Whether a refused parameter is set to something that would change what generate() does."""
    _, no_ops = REFUSED[name]
    return not any(value is v or (type(value) is type(v) and value == v) for v in no_ops)


def split_parameters(params: Mapping[str, Any], own: frozenset[str],
                     task: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(the task's own parameters, checked generate() parameters, the checked fields of a
    `generation_config` object or None) from a request's parameters.

    `own` names the pipeline's parameters, which the task checks itself. An unknown name is
    INVALID_ARGUMENT, as generate() refuses one.
    """
    params = dict(params)
    config = params.pop("generation_config", None)
    checked_config: dict[str, Any] | None = None
    if config is not None:
        checked_config = {}
        for key, value in json_object("generation_config", config).items():
            _take(f"generation_config.{key}", key, value, checked_config, task)
    pipeline: dict[str, Any] = {}
    generate: dict[str, Any] = {}
    for key, value in params.items():
        if value is None:
            continue
        if key in own or key in PIPESERVE_PARAMETERS:
            pipeline[key] = value
        else:
            _take(key, key, value, generate, task)
    return pipeline, generate, checked_config


def _take(field: str, key: str, value: Any, into: dict[str, Any], task: str) -> None:
    if value is None:
        return
    if key in GENERATE_PARAMETERS:
        into[key] = GENERATE_PARAMETERS[key](field, value)
    elif key in NO_EFFECT:
        return
    elif key in REFUSED:
        if refused_value(key, value):
            raise InvalidArgument(field, f"is not served: {REFUSED[key][0]}")
    else:
        raise InvalidArgument(field, f"is not a parameter of {task} (neither the pipeline's nor generate()'s); "
                              "see the README's parameter table")


def check_token_ids(generate: Mapping[str, Any], vocab_size: int) -> None:
    """Every token id a parameter names exists in the model's vocabulary (generate() fails on others)."""
    if not vocab_size:
        return
    for name in TOKEN_PARAMETERS:
        value = generate.get(name)
        if value is None:
            continue
        for token in _flatten(value):
            if token >= vocab_size:
                raise InvalidArgument(name, f"token id {token} is outside the model's vocabulary (size {vocab_size})")


def _flatten(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, float):
        return []  # a bias
    out: list[int] = []
    for item in value:
        out += _flatten(item)
    return out


# -- the model's generation config ------------------------------------------------------------

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


def eos_token_ids(generation_config: Any, hf_config: Any) -> tuple[int, ...]:
    eos = generation_config.eos_token_id
    if eos is None and hf_config is not None:
        eos = getattr(hf_config, "eos_token_id", None)
    return as_token_ids(eos)


def as_token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def vocab_size(hf_config: Any) -> int:
    if hf_config is None:
        return 0
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    return int(getattr(text, "vocab_size", 0) or 0)


# -- combinations generate() refuses ---------------------------------------------------------------

def check_combinations(resolved: Mapping[str, Any]) -> None:
    """The combinations generate() refuses, as INVALID_ARGUMENT naming the field: several sequences
    without sampling or beams, more sequences than beams, a minimum above the maximum."""
    beams = resolved.get("num_beams") or 1
    n = resolved.get("num_return_sequences") or 1
    if beams > 1 and n > beams:
        raise InvalidArgument("num_return_sequences", f"must be at most num_beams ({beams}), got {n}")
    if beams == 1 and not resolved.get("do_sample") and n > 1:
        raise InvalidArgument("num_return_sequences",
                              "must be 1 with greedy decoding (set do_sample to sample several, or num_beams)")
    if resolved.get("max_new_tokens") is None and resolved.get("min_new_tokens") is None:
        low, high = resolved.get("min_length") or 0, resolved.get("max_length")
        if high is not None and low > high:
            raise InvalidArgument("min_length", f"must be at most max_length ({high}), got {low}")
    low, high = resolved.get("min_new_tokens"), resolved.get("max_new_tokens")
    if low is not None and high is not None and low > high:
        raise InvalidArgument("min_new_tokens", f"must be at most max_new_tokens ({high}), got {low}")
    if resolved.get("do_sample") and resolved.get("temperature") is not None and resolved["temperature"] <= 0:
        raise InvalidArgument("temperature", "must be > 0 when sampling (do_sample false is greedy)")


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def generate_objects(kwargs: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """Checked parameters as generate() takes them: lists for tuples, the objects some want (a
    WatermarkingConfig, prompt tensors), the tokenizer for stop strings and token healing."""
    import torch
    from transformers import WatermarkingConfig

    out = {key: _plain(value) for key, value in kwargs.items()}
    if out.get("stop_strings") or out.get("token_healing"):
        out["tokenizer"] = tokenizer
    if out.get("watermarking_config") is not None:
        try:
            out["watermarking_config"] = WatermarkingConfig.from_dict(dict(out["watermarking_config"]))
        except (TypeError, ValueError) as exc:
            raise InvalidArgument("watermarking_config", str(exc)) from None
    for key in ("negative_prompt_ids", "negative_prompt_attention_mask"):
        if out.get(key) is not None:
            out[key] = torch.tensor([list(out[key])])
    return out


def _plain(value: Any) -> Any:
    """Tuples (the checked, hashable form) as lists; pairs of a frozen mapping as a dict."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
