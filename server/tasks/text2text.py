"""The encoder-decoder generation tasks' common steps (summarization, translation).

They keep transformers 4.x's Text2TextGenerationPipeline semantics (transformers 5 removed these
pipelines; 4.57 is the reference): the input (after the model's task prefix, e.g. T5's
"summarize: ") is tokenized, `generate()` runs, and each output sequence is decoded without
special tokens into {"<task>_text": ...} (or {"<task>_token_ids": ...} with return_tensors).

Unset parameters resolve as 4.57's pipeline resolves them (`Pipeline.__init__` and
`_prepare_generation_config`): the pipeline's own defaults (num_beams 4, max_new_tokens 256)
under the model's generation config wherever the model sets a value other than generate()'s
default, then the model's `task_specific_params` for the task, then the request's parameters;
the lengths as 4.57's generate counts them. The result is passed to transformers 5's generate()
as explicit arguments, so that it runs what 4.57 would.

Whole sequences run through the dynamic batcher (`Instance.generate`); inputs batch together only
when their generation parameters are equal, and a seeded sampling request runs input by input, so
that batching never changes an output.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pipeserve.backends.base import Instance
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.generation_checks import check_seed
from pipeserve.server.tasks.generation_params import (
    DEFAULT_GENERATOR,
    GENERATE_DEFAULTS,
    GENERATE_PARAMETERS,
    check_bool,
    check_combinations,
    check_token_ids,
    generate_objects,
    model_generation_config,
    model_set_parameters,
    split_parameters,
    vocab_size,
)

# Text2TextGenerationPipeline._default_generation_config (4.57; summarization and translation inherit it).
PIPELINE_DEFAULTS: dict[str, Any] = {"max_new_tokens": 256, "num_beams": 4}
# transformers 4.57's GenerationConfig() values that are not None: what its "is this the default?"
# comparisons compare with (tests/test_generation_parameters.py checks them against 4.57).
GENERATION_CONFIG_DEFAULTS_4X: dict[str, Any] = {
    "max_length": 20, "min_length": 0, "early_stopping": False, "do_sample": False, "num_beams": 1,
    "use_cache": True, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "renormalize_logits": False, "remove_invalid_values": False, "token_healing": False,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "return_dict_in_generate": False, "encoder_no_repeat_ngram_size": 0, "is_assistant": False,
    "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10, "target_lookbehind": 10, "disable_compile": False, "diversity_penalty": 0.0,
    "num_beam_groups": 1,
}
# 4.57's Text2TextGenerationPipeline._sanitize_parameters.
PIPELINE_PARAMETERS = frozenset({"return_tensors", "return_text", "return_type", "clean_up_tokenization_spaces",
                                 "truncation", "stop_sequence"})
RETURN_TYPES = {0: "tensors", 1: "text", "tensors": "tensors", "text": "text"}
_TRUNCATE = (True, "longest_first", "only_first", "only_second")
_NO_TRUNCATION = (False, "do_not_truncate")
# An encoder-decoder's decoder starts from one token (decoder_start_token_id): the length that
# generate's max_length and min_length count beyond the new tokens.
_DECODER_START = 1
_unique = itertools.count()


@dataclass(frozen=True)
class Text2TextPost:
    num_return_sequences: int
    clean_up_tokenization_spaces: bool
    return_type: str = "text"


class Text2TextTask(TokenizingTask):
    """Base of the encoder-decoder tasks; a subclass names its output key and its task params."""

    model_class = "AutoModelForSeq2SeqLM"
    output_names = ("sequences",)
    #: The result's key, e.g. "summary_text"; the token ids' key replaces "_text" by "_token_ids".
    result_key: ClassVar[str] = "generated_text"
    #: The pipeline's parameters beyond Text2TextGenerationPipeline's (translation's languages).
    task_parameters: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, context):
        super().__init__(context)
        self.generation_config = model_generation_config(context)
        self.model_params = model_set_parameters(self.generation_config)
        self.limits = self.settings.generation
        self.model_prefix = getattr(context.hf_config, "prefix", None) or ""
        self.vocab_size = vocab_size(context.hf_config)
        self.max_positions = getattr(context.hf_config, "max_position_embeddings", None)
        version = str(getattr(self.generation_config, "transformers_version", None) or "0")
        # 4.57's generate() fills unset values from the model's config only for configs saved by 4.50 on.
        self.model_defaults_apply = _version(version) >= (4, 50)

    # -- parameters ----------------------------------------------------------------------------

    def task_params(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], Hashable]:
        """(prefix, task_specific_params entry, extra preprocessing key) for this request.
        Subclasses read their task_specific_params (and languages) here."""
        return self.model_prefix, {}, ()

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        own, request, config = split_parameters(self.with_defaults(params), PIPELINE_PARAMETERS | self.task_parameters,
                                                self.name)
        for name in ("max_new_tokens", "max_length", "min_length", "min_new_tokens"):
            if request.get(name) is not None:
                request[name] = check_int(name, request[name], 0 if name.startswith("min") else 1,
                                          self.limits.max_new_tokens_limit)
        if own.get("stop_sequence") is not None:
            request["eos_token_id"] = self._stop_token(own["stop_sequence"])
        check_token_ids(request, self.vocab_size)
        prefix, specific, extra = self.task_params(own)
        resolved = self._resolve({k: v for k, v in specific.items() if k in GENERATE_PARAMETERS}, request, config)
        check_combinations(resolved)
        kwargs = self._generate_kwargs(resolved, request)
        seed = check_seed(own["seed"]) if own.get("seed") is not None else None
        n = resolved.get("num_return_sequences") or 1
        fwd: tuple = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items()))
        if resolved.get("do_sample") and seed is not None:
            # Seeded inputs run alone (see forward); a unique key keeps them out of shared batches.
            fwd += (("seed", seed), ("_alone", next(_unique)))
        clean = own.get("clean_up_tokenization_spaces")
        clean = False if clean is None else check_bool("clean_up_tokenization_spaces", clean)
        truncate = self._truncation(own.get("truncation"))
        return TaskParams(pre=(prefix, extra, truncate), fwd=fwd,
                          post=Text2TextPost(n, clean, self._return_type(own)))

    def _resolve(self, specific: dict[str, Any], request: dict[str, Any],
                 generation_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """The generation config 4.57's pipeline runs generate() with, over generate()'s defaults.
        A request's generation_config replaces the pipeline's (defaults and task_specific_params
        included), as in 4.57's Text2TextGenerationPipeline._forward."""
        if generation_config is not None:
            config = {**GENERATION_CONFIG_DEFAULTS_4X, **generation_config}
        else:
            config = {**GENERATION_CONFIG_DEFAULTS_4X, **PIPELINE_DEFAULTS}
            self._model_defaults(config)  # Pipeline.__init__: _prepare_generation_config(use_model_defaults=True)
            if (config.get("max_new_tokens") == PIPELINE_DEFAULTS["max_new_tokens"]
                    and config.get("max_length") is not None and config["max_length"] != 20):
                config["max_new_tokens"] = None  # a model's own max_length wins over the pipeline's length default
            config.update(specific)  # the model's task_specific_params
            if config.get("pad_token_id") is None and self.tokenizer.pad_token_id is not None:
                config["pad_token_id"] = self.tokenizer.pad_token_id
        if self.model_defaults_apply:  # generate(): _prepare_generation_config again, for the call
            self._model_defaults(config)
        else:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                if config.get(key) is None and self.model_params.get(key) is not None:
                    config[key] = self.model_params[key]
        config.update(request)
        # generate's _prepare_generated_length, as 4.57 counts: lengths include the decoder's start.
        if config.get("max_new_tokens") is not None:
            config["max_length"] = config["max_new_tokens"] + _DECODER_START
        elif "max_length" not in request and config.get("max_length") == 20:
            config["max_length"] = 20 + _DECODER_START
            if self.max_positions:
                config["max_length"] = min(config["max_length"], self.max_positions)
        if config.get("min_new_tokens") is not None:
            config["min_length"] = config["min_new_tokens"] + _DECODER_START
        limit = self.limits.max_new_tokens_limit + _DECODER_START
        if config["max_length"] > limit:  # a default past the server's limit is held to it
            config["max_length"] = limit
        return config

    def _model_defaults(self, config: dict[str, Any]) -> None:
        """4.57's use_model_defaults: every value still at generate()'s default takes the model's."""
        for key, value in self.model_params.items():
            default = GENERATION_CONFIG_DEFAULTS_4X.get(key)
            if config.get(key) == default and value != default:
                config[key] = value
        if config.get("temperature") == 0.0:
            config["do_sample"] = False

    def _generate_kwargs(self, resolved: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
        """transformers 5 generate() arguments that make it run the resolved config: each value
        that differs from what 5.x would take itself (the model's, else generate()'s default), and
        the lengths as new tokens (5.x counts a model's own max_new_tokens over a max_length)."""
        kwargs: dict[str, Any] = {"min_new_tokens": max(0, (resolved.get("min_length") or 0) - _DECODER_START)}
        if "max_new_tokens" in self.model_params:  # 5.x would count it over an explicit max_length
            kwargs["max_new_tokens"] = max(1, resolved["max_length"] - _DECODER_START)
        else:
            kwargs["max_length"] = resolved["max_length"]
        for key, value in resolved.items():
            if key not in GENERATE_PARAMETERS or value is None or key in (
                    "max_length", "max_new_tokens", "min_length", "min_new_tokens"):
                continue
            if value != self.model_params.get(key, GENERATE_DEFAULTS.get(key)):
                kwargs[key] = value
        if not kwargs["min_new_tokens"]:
            del kwargs["min_new_tokens"]
        return kwargs

    def _stop_token(self, stop: Any) -> int:
        """4.x's stop_sequence: its first token becomes the end-of-sequence token."""
        if not isinstance(stop, str):
            raise InvalidArgument("stop_sequence", f"must be a string, got {stop!r}")
        ids = self.tokenizer.encode(stop, add_special_tokens=False)
        if not ids:
            raise InvalidArgument("stop_sequence", "has no tokens")
        return int(ids[0])

    @staticmethod
    def _return_type(own: dict[str, Any]) -> str:
        kind = own.get("return_type")
        if kind is not None:
            if kind not in RETURN_TYPES or isinstance(kind, bool):
                raise InvalidArgument("return_type", f"must be tensors or text (0, 1), got {kind!r}")
            return RETURN_TYPES[kind]
        if own.get("return_text") is not None:
            check_bool("return_text", own["return_text"])  # 4.x reads it nowhere
        if own.get("return_tensors") is not None:
            return "tensors" if check_bool("return_tensors", own["return_tensors"]) else "text"
        return "text"

    @staticmethod
    def _truncation(value: Any) -> bool:
        """Whether an input past the model's length is cut (the server's default) or refused."""
        if value is None:
            return True
        if isinstance(value, (bool, str)) and value in _TRUNCATE + _NO_TRUNCATION:
            return value in _TRUNCATE
        raise InvalidArgument("truncation", f"must be one of {', '.join(map(repr, _TRUNCATE + _NO_TRUNCATION))}, "
                              f"got {value!r}")

    # -- the steps -----------------------------------------------------------------------------

    def preprocess(self, inputs: Sequence[str], pre: Hashable) -> Any:
        prefix, extra, truncate = pre  # type: ignore[misc]
        features = dict(self._tokenize([prefix + text for text in inputs], truncate))
        features.pop("token_type_ids", None)  # as transformers' pipeline drops them
        return features

    def _tokenize(self, texts: list[str], truncate: bool) -> Any:
        if truncate:
            return self.tokenize(texts)
        lengths = self.tokenizer(texts, truncation=False, return_length=True)["length"]
        for n in lengths:
            if n > self.max_length:
                raise InvalidArgument("input", f"has {n} tokens but the model accepts at most {self.max_length} "
                                      "(truncation is off); shorten the input or allow truncation")
        return self.tokenizer(texts, padding=True, truncation=False, return_tensors="pt")

    def forward(self, features: Any, fwd: Hashable, instance: Instance) -> Any:
        kwargs = dict(fwd)  # type: ignore[arg-type]
        kwargs.pop("_alone", None)
        seed = kwargs.pop("seed", None)
        if "watermarking_config" in kwargs:
            kwargs["watermarking_config"] = dict(kwargs["watermarking_config"])
        kwargs = generate_objects(kwargs, self.tokenizer)
        features = dict(features)
        forced_bos = features.pop("forced_bos_token_id", None)
        if forced_bos is not None:
            kwargs["forced_bos_token_id"] = int(forced_bos)
        n = kwargs.get("num_return_sequences", 1)
        try:
            if not kwargs.get("do_sample", self._model("do_sample")):
                output = instance.generate(features, **kwargs)
            elif seed is None:
                with DEFAULT_GENERATOR:
                    output = instance.generate(features, **kwargs)
            else:
                # As `torch.manual_seed(seed); pipeline(text)` would, for each input on its own.
                rows = []
                for i in range(features["input_ids"].shape[0]):
                    one = {k: v[i : i + 1] for k, v in features.items()}
                    with DEFAULT_GENERATOR:
                        torch.manual_seed(seed)
                        rows.append(instance.generate(one, **kwargs))
                return [list(r) for r in rows]
        except ValueError as exc:  # generate() refusing the parameters (its own validation)
            raise InvalidArgument("parameters", f"generate() refused them: {exc}") from None
        return [list(output[i * n : (i + 1) * n]) for i in range(features["input_ids"].shape[0])]

    def _model(self, name: str) -> Any:
        value = getattr(self.generation_config, name, None)
        return GENERATE_DEFAULTS[name] if value is None else value

    def postprocess(self, inputs, features, outputs, posts: Sequence[Text2TextPost]) -> list[Any]:
        ids_key = self.result_key.removesuffix("_text") + "_token_ids"
        return [
            [{ids_key: ids.tolist()} if post.return_type == "tensors" else
             {self.result_key: self.tokenizer.decode(ids, skip_special_tokens=True,
                                                     clean_up_tokenization_spaces=post.clean_up_tokenization_spaces)}
             for ids in sequences]
            for sequences, post in zip(outputs, posts)
        ]


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)
