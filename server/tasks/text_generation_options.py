"""text-generation's parameters once checked: the pipeline's own, the request's options as the
task resolves them (`GenerationOptions`), and the checks of their values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.generation.sampling import SamplingParams
from pipeserve.server.tasks.generation_params import ENGINE_PARAMETERS, GENERATE_PARAMETERS, check_bool

# transformers 5's TextGenerationPipeline._default_generation_config, for what the model's
# generation config leaves unset (the pipeline adds the tokenizer's pad token too).
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
# The pipeline's defaults for these apply only when sampling (Pipeline._prepare_generate_kwargs).
SAMPLING_ONLY = frozenset({"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
                            "eta_cutoff"})
MAX_RETURN_SEQUENCES = 64
MAX_TOP_LOGPROBS = 20

# The pipeline's own parameters (TextGenerationPipeline._sanitize_parameters, and the two it pops
# from the generate kwargs), then pipeserve's. max_length is both the tokenizer's and generate()'s.
PIPELINE_PARAMETERS = frozenset({
    "return_full_text", "return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces", "prefix",
    "handle_long_generation", "stop_sequence", "truncation", "max_length", "continue_final_message",
    "skip_special_tokens", "tokenizer_encode_kwargs", "tools", "documents", "add_special_tokens", "padding",
})
PIPESERVE_PARAMETERS = frozenset({"stop_sequences", "logprobs", "top_logprobs", "seed"})

RETURN_TYPES = {0: "tensors", 1: "new_text", 2: "full_text", "tensors": "tensors", "new_text": "new_text",
                "full_text": "full_text"}
TRUNCATIONS = (True, False, "longest_first", "only_first", "only_second", "do_not_truncate")
PADDINGS = (False, True, "longest", "do_not_pad")
# tokenizer_encode_kwargs for a prompt string: tokenizer options, not the output form.
ENCODE_KEYS = frozenset({"add_special_tokens", "truncation", "max_length", "padding", "split_special_tokens"})


@dataclass(frozen=True)
class GenerationOptions:
    """A request's parameters, checked and resolved against the model's and the pipeline's defaults."""

    # generate()'s keyword arguments as the pipeline passes them (the request's and the defaults
    # it adds; the model's generation config fills in the rest): what a whole sequence runs with.
    generate: dict[str, Any] = field(default_factory=dict)
    # The same resolved over the model's and generate()'s defaults: what the engine's chooser uses.
    resolved: dict[str, Any] = field(default_factory=dict)
    whole_sequence: bool = False
    sampling: SamplingParams = SamplingParams()
    eos_token_ids: tuple[int, ...] = ()
    # transformers' stop_sequence (generate's stop_strings): the text keeps the token that completes one.
    stop_strings: tuple[str, ...] = ()
    # pipeserve's stop_sequences: the text ends right after one.
    stop_sequences: tuple[str, ...] = ()
    return_type: str = "full_text"
    clean_up_tokenization_spaces: bool | None = None
    skip_special_tokens: bool = True
    prefix: str = ""
    prefix_length: int = 0
    handle_long_generation: str | None = None
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    encode_kwargs: dict[str, Any] = field(default_factory=dict)
    continue_final_message: bool | None = None
    tools: list[Any] | None = None
    documents: list[Any] | None = None
    num_return_sequences: int = 1
    top_logprobs: int | None = None
    seed: int | None = None

    @property
    def return_full_text(self) -> bool:
        return self.return_type == "full_text"


@dataclass(frozen=True)
class Prompt:
    """One input tokenized: its ids, and what the result is built on (the text or the messages)."""

    ids: list[int]
    messages: list[dict[str, Any]] | None = None


def one_of(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if isinstance(value, (bool, str)) and value in allowed:
        return value
    raise InvalidArgument(name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def optional_bool(own: dict[str, Any], name: str) -> bool | None:
    value = own.get(name)
    return None if value is None else check_bool(name, value)


def long_generation(value: Any) -> str | None:
    if value is None or value == "hole":
        return value
    raise InvalidArgument("handle_long_generation", f"must be \"hole\" (or unset), got {value!r}")


def json_list(own: dict[str, Any], name: str) -> list[Any] | None:
    value = own.get(name)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
        raise InvalidArgument(name, f"must be a list of objects (JSON schemas for tools, documents with title and "
                              f"text), got {value!r}")
    return list(value)


# A served parameter outside ENGINE_PARAMETERS with one of these values changes nothing.
INERT: dict[str, tuple[Any, ...]] = {
    "num_beams": (1,),
    "guidance_scale": (1, 1.0),
    "renormalize_logits": (False,),
    "remove_invalid_values": (False,),
    "token_healing": (False,),
    "encoder_repetition_penalty": (1, 1.0),
    "encoder_no_repeat_ngram_size": (0,),
}
# Served parameters that do nothing on their own (prompt lookup's n-gram size, guidance's negative prompt).
DEPENDENT = frozenset({"max_matching_ngram_size", "negative_prompt_ids", "negative_prompt_attention_mask"})


def needs_whole_sequence(resolved: dict[str, Any]) -> bool:
    """Whether the resolved parameters ask for something the engine's chooser lacks."""
    for key, value in resolved.items():
        if key not in GENERATE_PARAMETERS or key in ENGINE_PARAMETERS or key in DEPENDENT or value is None:
            continue
        if value in INERT.get(key, ()):
            continue
        return True
    return False
