"""The tokenizer arguments that transformers' pipelines pass through to the tokenizer and that change
a result: `truncation`, `max_length` and `add_special_tokens` (text-classification's tokenizer
keyword arguments, fill-mask's tokenizer_kwargs, feature-extraction's truncation and
tokenize_kwargs). Checked once per request (`tokenizer_options`), applied to a batch (`tokenize`).

Padding is not among them: the server pads each batch itself (to its longest input, on the
tokenizer's side), and padding never changes a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TokenizingTask

TRUNCATIONS = ("longest_first", "only_first", "only_second", "do_not_truncate")
# The parameters `tokenizer_options` reads, with transformers' names.
PARAMETERS = ("truncation", "max_length", "add_special_tokens")


@dataclass(frozen=True)
class TokenizerOptions:
    """A request's tokenizer arguments; the default one leaves the model's own policy in place."""

    # None: cut to the model's maximum, or refuse, as the model's config.pbtxt says (truncation).
    truncation: str | None = None
    # Tokens to cut to (with a truncation strategy); None: the model's maximum.
    max_length: int | None = None
    add_special_tokens: bool = True


DEFAULT_OPTIONS = TokenizerOptions()


def tokenizer_options(params: Mapping[str, Any], model_max_length: int) -> TokenizerOptions:
    """The request's truncation, max_length and add_special_tokens, checked (transformers' meanings:
    truncation True is "longest_first", False "do_not_truncate"; max_length alone truncates
    longest_first)."""
    truncation = params.get("truncation")
    if isinstance(truncation, bool):
        truncation = "longest_first" if truncation else "do_not_truncate"
    elif truncation is not None:
        if not isinstance(truncation, str) or truncation.lower() not in TRUNCATIONS:
            raise InvalidArgument("truncation", f"must be true, false or one of {', '.join(TRUNCATIONS)}; "
                                  f"got {truncation!r}")
        truncation = truncation.lower()
    max_length = params.get("max_length")
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise InvalidArgument("max_length", f"must be a positive integer, got {max_length!r}")
        if max_length > model_max_length:
            raise InvalidArgument("max_length", f"is {max_length} but this model takes at most {model_max_length} tokens")
        if truncation is None:
            truncation = "longest_first"
    add_special_tokens = params.get("add_special_tokens", True)
    if add_special_tokens is None:
        add_special_tokens = True
    if not isinstance(add_special_tokens, bool):
        raise InvalidArgument("add_special_tokens", f"must be a boolean, got {add_special_tokens!r}")
    return TokenizerOptions(truncation, max_length, add_special_tokens)


def tokenize(task: TokenizingTask, texts: Sequence[str], pairs: Sequence[str | None] | None = None,
             options: TokenizerOptions = DEFAULT_OPTIONS, **kwargs: Any) -> Any:
    """A batch tokenized as `options` say, padded to its longest input, as torch tensors.

    `pairs` gives each text its second text, or None where it has none; a batch may mix both (each
    input is then tokenized as transformers' pipeline tokenizes it alone, and the batch padded).
    """
    texts = list(texts)
    pairs = list(pairs) if pairs is not None and any(p is not None for p in pairs) else None
    call: dict[str, Any] = {"add_special_tokens": options.add_special_tokens, **kwargs}
    truncation = options.truncation
    if truncation is None:
        truncation = "do_not_truncate" if task.reject_overlong else "longest_first"
        reject_reason = ("(this model's config sets truncation: TRUNCATION_REJECT); shorten the input"
                         if task.reject_overlong else "")
    else:
        reject_reason = "(the request set truncation=False); shorten the input or let it be truncated"
    if truncation == "do_not_truncate":
        for n in _lengths(task, texts, pairs, call):
            if n > task.max_length:
                raise InvalidArgument("input", f"has {n} tokens but the model accepts at most {task.max_length} "
                                      f"{reject_reason}")
        call["truncation"] = False
    else:
        call["truncation"] = truncation
        call["max_length"] = options.max_length or task.max_length
    try:
        if pairs is None or all(p is not None for p in pairs):
            encoded = task.tokenizer(texts, pairs, padding=True, return_tensors="pt", **call)
        else:
            # A batch mixing single texts and pairs: each as the pipeline would tokenize it, then padded.
            encoded = task.tokenizer.pad([task.tokenizer(text, pair, **call) for text, pair in zip(texts, pairs)],
                                         padding=True, return_tensors="pt")
    except Exception as exc:  # the tokenizers library refuses a strategy it cannot apply, with many types
        cut = f" to {call['max_length']} tokens" if "max_length" in call else ""
        raise InvalidArgument("input", f"cannot be tokenized with truncation {truncation!r}{cut}: {exc}") from None
    # A max_length below the special tokens' count makes the tokenizer give up cutting (with a warning).
    if encoded["input_ids"].shape[-1] > task.max_length:
        raise InvalidArgument("max_length", f"{options.max_length} leaves no room for the text beside the special "
                              "tokens, and the tokenizer does not cut then; the input is longer than the model's "
                              f"{task.max_length} tokens")
    return encoded


def _lengths(task: TokenizingTask, texts: list[str], pairs: list[str | None] | None, call: dict[str, Any]) -> list[int]:
    if pairs is None or all(p is not None for p in pairs):
        return list(task.tokenizer(texts, pairs, truncation=False, return_length=True,
                                   verbose=False, **call)["length"])
    return [len(task.tokenizer(t, p, truncation=False, verbose=False, **call)["input_ids"]) for t, p in zip(texts, pairs)]
