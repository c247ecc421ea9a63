"""What a task's remote pipeline takes, by transformers' parameter names, and what it refuses.

Each task codec holds a `ParameterTable`: the parameters it serves (they cross the wire as typed
fields), those it accepts and ignores (they cannot change a remote result), and those it refuses
with the reason (they cannot cross a wire: callables, tensors of the caller's process, objects of
a tokenizer the server does not run). A parameter in none of them is a TypeError too, so that a
typo never passes silently. tests/test_pipeline_parameters.py checks the tables against
transformers' own signatures: a parameter a new transformers adds fails there until it is put in
one of them on purpose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ParameterTable:
    """A task's call parameters: served (name: what it does), ignored and refused (name: why)."""

    served: Mapping[str, str]
    ignored: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.served) | set(self.ignored) | set(self.refused)

    def check(self, task: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The served parameters of a call; TypeError naming a refused or unknown one."""
        for name in params:
            if name in self.refused:
                raise TypeError(f"{task}: {name} is not served: {self.refused[name]}")
            if name not in self.served and name not in self.ignored:
                raise TypeError(f"{task} got an unknown parameter {name!r}; it takes {', '.join(sorted(self.served))}")
        return {name: value for name, value in params.items() if name in self.served}

    def merged(self, other: ParameterTable) -> ParameterTable:
        """This table with `other`'s entries added; where both name a parameter, this one's stands."""
        mine = self.names()

        def theirs(entries: Mapping[str, str]) -> dict[str, str]:
            return {name: text for name, text in entries.items() if name not in mine}

        return ParameterTable({**theirs(other.served), **self.served}, {**theirs(other.ignored), **self.ignored},
                              {**theirs(other.refused), **self.refused})


# Keyword arguments every transformers pipeline call takes (Pipeline.__call__).
CALL_OPTIONS = ParameterTable(
    served={},
    ignored={
        "batch_size": "the server batches requests itself (dynamic batching); results do not depend on it",
        "num_workers": "the server runs the work; there is no local data loader",
    },
)

# The tokenizer arguments that transformers' pipelines pass to the tokenizer: text-classification's
# **tokenizer_kwargs, fill-mask's tokenizer_kwargs, feature-extraction's tokenize_kwargs.
TOKENIZER_ARGUMENTS = ParameterTable(
    served={
        "truncation": "True, False or a strategy (longest_first, only_first, only_second, do_not_truncate)",
        "max_length": "tokens to cut each input to (at most the model's maximum)",
        "add_special_tokens": "whether to add the model's special tokens",
    },
    ignored={
        "padding": "the server pads each batch itself; padding never changes a result",
        "pad_to_multiple_of": "the server pads each batch itself; padding never changes a result",
        "padding_side": "the server pads each batch itself; padding never changes a result",
        "verbose": "the tokenizer's warnings are the server's to log",
        "stride": "windows need return_overflowing_tokens, which these pipelines cannot take; alone it changes nothing",
    },
    refused={
        "text": "the inputs are the call's positional argument",
        "text_pair": "this task takes single texts (text-classification takes pairs)",
        "text_target": "targets are a sequence-to-sequence tokenizer's; this task has none",
        "text_pair_target": "targets are a sequence-to-sequence tokenizer's; this task has none",
        "is_split_into_words": "this task takes texts (pre-split words are token-classification's)",
        "return_tensors": "tensors of the caller's process cannot cross the wire; the server tokenizes",
        "return_token_type_ids": "decides which tensors the model sees, which the server's backend fixes",
        "return_attention_mask": "decides which tensors the model sees, which the server's backend fixes",
        "return_overflowing_tokens": "extra tensors that transformers' pipeline hands to the model, which fails; "
                                     "the server computes what the task needs",
        "return_special_tokens_mask": "extra tensors that transformers' pipeline hands to the model, which fails",
        "return_offsets_mapping": "extra tensors that transformers' pipeline hands to the model, which fails",
        "return_length": "extra tensors that transformers' pipeline hands to the model, which fails",
        "tokenizer_kwargs": "pass the tokenizer arguments themselves",
        "split_special_tokens": "the server tokenizes special-token text as the model's tokenizer is configured",
    },
)


def tokenizer_options(task: str, kwargs: Mapping[str, Any], into: Any, where: str = "") -> None:
    """Checks tokenizer arguments (TOKENIZER_ARGUMENTS) and sets the served ones on a
    pipeserve.v1.TokenizerOptions message. `where` names the dict they came in (tokenizer_kwargs)."""
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{task}: {where or 'tokenizer arguments'} must be a dict, got {type(kwargs).__name__}")
    served = TOKENIZER_ARGUMENTS.check(f"{task} {where}".strip(), kwargs)
    truncation = served.get("truncation")
    if truncation is not None:
        into.truncation = truncation_number(task, getattr(truncation, "value", truncation))
    if served.get("max_length") is not None:
        into.max_length = int_value(task, "max_length", served["max_length"])
    if served.get("add_special_tokens") is not None:
        into.add_special_tokens = bool(served["add_special_tokens"])


_TRUNCATIONS = {"longest_first": 1, "only_first": 2, "only_second": 3, "do_not_truncate": 4}


def truncation_number(task: str, truncation: Any) -> int:
    """transformers' truncation (a bool, a strategy name or TruncationStrategy) as the wire enum."""
    if isinstance(truncation, bool):
        return _TRUNCATIONS["longest_first" if truncation else "do_not_truncate"]
    if isinstance(truncation, str) and truncation.lower() in _TRUNCATIONS:
        return _TRUNCATIONS[truncation.lower()]
    raise ValueError(f"{task}: truncation must be True, False or one of {', '.join(_TRUNCATIONS)}, got {truncation!r}")


def int_value(task: str, name: str, value: Any) -> int:
    """An integer parameter as the wire takes it (range checks are the server's)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if hasattr(value, "__index__") and not isinstance(value, bool):  # numpy integers
            return int(value.__index__())
        raise TypeError(f"{task}: {name} must be an integer, got {value!r}")
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{task}: {name} {value} is out of range")
    return value
