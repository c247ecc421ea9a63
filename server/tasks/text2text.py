"""The encoder-decoder generation tasks' common steps (summarization, translation).

They keep transformers 4.x's Text2TextGenerationPipeline semantics: the input (after the model's
task prefix, e.g. T5's "summarize: ") is tokenized, `generate()` runs with the model's generation
config, the task's `task_specific_params` and the request's parameters on top, and each output
sequence is decoded without special tokens into {"<task>_text": ...}. Whole sequences run through
the dynamic batcher (`Instance.generate`); inputs batch together only when their generation
parameters are equal, and a seeded sampling request runs input by input, so that batching never
changes an output.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pipeserve.backends.base import Instance
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_float, check_int
from pipeserve.server.tasks.generation_params import (
    GENERATE_DEFAULTS,
    check_bool,
    check_sampling,
    model_generation_config,
)

# torch's default generator is process-wide and generate() samples from it: a seeded call holds
# this lock from seeding to its last draw, so that no other sampling thread moves it meanwhile.
_DEFAULT_GENERATOR = threading.Lock()

# generate() parameters a task_specific_params entry may set (the rest, like "prefix", are the task's).
_GENERATION_KEYS = frozenset(GENERATE_DEFAULTS) | {"max_new_tokens", "min_new_tokens", "bad_words_ids",
                                                   "forced_bos_token_id", "forced_eos_token_id"}
MAX_BEAMS = 32
_unique = itertools.count()


@dataclass(frozen=True)
class Text2TextPost:
    num_return_sequences: int
    clean_up_tokenization_spaces: bool


class Text2TextTask(TokenizingTask):
    """Base of the encoder-decoder tasks; a subclass names its output key and its task params."""

    model_class = "AutoModelForSeq2SeqLM"
    output_names = ("sequences",)
    #: The result's key, e.g. "summary_text".
    result_key: ClassVar[str] = "generated_text"

    def __init__(self, context):
        super().__init__(context)
        self.generation_config = model_generation_config(context)
        self.limits = self.settings.generation
        self.model_prefix = getattr(context.hf_config, "prefix", None) or ""

    # -- parameters ----------------------------------------------------------------------------

    def task_params(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], Hashable]:
        """(prefix, generate() defaults, extra preprocessing key) for this request. Subclasses
        read their task_specific_params (and languages) here."""
        return self.model_prefix, {}, ()

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        params = self.with_defaults(params)
        prefix, task_defaults, extra = self.task_params(params)
        kwargs = {**task_defaults, **check_sampling(params)}
        limit = self.limits.max_new_tokens_limit
        for name, low in (("max_new_tokens", 1), ("max_length", 1), ("min_length", 0)):
            if params.get(name) is not None:
                kwargs[name] = check_int(name, params[name], low, limit)
        if params.get("num_beams") is not None:
            kwargs["num_beams"] = check_int("num_beams", params["num_beams"], 1, MAX_BEAMS)
        if params.get("no_repeat_ngram_size") is not None:
            kwargs["no_repeat_ngram_size"] = check_int("no_repeat_ngram_size", params["no_repeat_ngram_size"], 0)
        if params.get("early_stopping") is not None:
            kwargs["early_stopping"] = check_bool("early_stopping", params["early_stopping"])
        if params.get("length_penalty") is not None:
            kwargs["length_penalty"] = check_float("length_penalty", params["length_penalty"], -100.0, 100.0)
        self._bound_length(kwargs)
        beams = kwargs.get("num_beams", self._model("num_beams"))
        sampling = kwargs.get("do_sample", self._model("do_sample"))
        n = check_int("num_return_sequences", params.get("num_return_sequences") or 1, 1, max(beams, 16))
        if beams > 1 and n > beams:
            raise InvalidArgument("num_return_sequences", f"must be at most num_beams ({beams}), got {n}")
        if beams == 1 and not sampling and n > 1:
            raise InvalidArgument("num_return_sequences", "must be 1 with greedy decoding (set do_sample or num_beams)")
        if "min_length" in kwargs and kwargs["min_length"] > kwargs.get("max_length", kwargs["min_length"]):
            raise InvalidArgument("min_length", f"must be at most max_length ({kwargs['max_length']})")
        if n > 1:
            kwargs["num_return_sequences"] = n
        seed = kwargs.pop("seed", None)
        fwd: tuple = tuple(sorted(kwargs.items()))
        if sampling and seed is not None:
            # Seeded inputs run alone (see forward); a unique key keeps them out of shared batches.
            fwd += (("seed", seed), ("_alone", next(_unique)))
        clean = params.get("clean_up_tokenization_spaces")
        clean = False if clean is None else check_bool("clean_up_tokenization_spaces", clean)
        return TaskParams(pre=(prefix, extra), fwd=fwd, post=Text2TextPost(n, clean))

    def _model(self, name: str) -> Any:
        value = getattr(self.generation_config, name, None)
        return GENERATE_DEFAULTS[name] if value is None else value

    def _bound_length(self, kwargs: dict[str, Any]) -> None:
        """Keeps the output within generation.max_new_tokens_limit when the request sets no length."""
        if "max_new_tokens" in kwargs or "max_length" in kwargs:
            return
        limit = self.limits.max_new_tokens_limit
        model_new = self.generation_config.max_new_tokens
        if model_new is not None:
            if model_new > limit:
                kwargs["max_new_tokens"] = limit
        elif self._model("max_length") > limit:
            kwargs["max_length"] = limit

    # -- the steps -----------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[str], pre: Hashable) -> Any:
        prefix, extra = pre  # type: ignore[misc]
        features = dict(self.tokenize([prefix + text for text in inputs]))
        features.pop("token_type_ids", None)  # as transformers' pipeline drops them
        return features

    def forward(self, features: Any, fwd: Hashable, instance: Instance) -> Any:
        kwargs = dict(fwd)  # type: ignore[arg-type]
        kwargs.pop("_alone", None)
        seed = kwargs.pop("seed", None)
        features = dict(features)
        forced_bos = features.pop("forced_bos_token_id", None)
        if forced_bos is not None:
            kwargs["forced_bos_token_id"] = int(forced_bos)
        n = kwargs.get("num_return_sequences", 1)
        if not kwargs.get("do_sample", self._model("do_sample")):
            output = instance.generate(features, **kwargs)
        elif seed is None:
            with _DEFAULT_GENERATOR:
                output = instance.generate(features, **kwargs)
        else:
            # As `torch.manual_seed(seed); pipeline(text)` would, for each input on its own.
            rows = []
            for i in range(features["input_ids"].shape[0]):
                one = {k: v[i : i + 1] for k, v in features.items()}
                with _DEFAULT_GENERATOR:
                    torch.manual_seed(seed)
                    rows.append(instance.generate(one, **kwargs))
            return [list(r) for r in rows]
        return [list(output[i * n : (i + 1) * n]) for i in range(features["input_ids"].shape[0])]

    def postprocess(self, inputs, features, outputs, posts: Sequence[Text2TextPost]) -> list[Any]:
        return [
            [{self.result_key: self.tokenizer.decode(ids, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=post.clean_up_tokenization_spaces)}
             for ids in sequences]
            for sequences, post in zip(outputs, posts)
        ]
