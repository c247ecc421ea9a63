"""Per-task v2 signatures: the tensors a pipeserve model takes and returns over KServe v2.

A codec turns a request's named numpy arrays and parameters into the task's Python inputs and
parameters (what `DataPlane.infer` takes), and the task's results back into named numpy arrays.
The first dimension of every tensor is the request's inputs, one row per input.

Codecs are found through the task class's bases, so a custom task that subclasses a built-in one
(registered by entry point under a new name) is served with its parent's tensors and no code; any
other task gets the generic codec: TEXT (or JSON) in, one JSON document per input out.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.errors import InvalidArgument


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # -1: any size. The first dimension is the number of inputs in the request.
    shape: tuple[int, ...]
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class V2Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Request parameters the task takes, with what they mean; None: any, passed to the task as sent.
    parameters: dict[str, str] | None
    # One request, many responses (token streaming): Triton's decoupled transaction policy.
    decoupled: bool = False

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)


class TaskCodec:
    """Translates between v2 tensors and one task's Python inputs and results."""

    #: The registered task name this codec serves (and, through their bases, the tasks derived from it).
    task: ClassVar[str] = ""

    def __init__(self, served: Any):
        self.served = served
        self.signature = self.build_signature()

    def build_signature(self) -> V2Signature:
        raise NotImplementedError

    def decode(self, tensors: dict[str, np.ndarray], params: dict[str, Any],
               requested: set[str]) -> tuple[list[Any], dict[str, Any]]:
        """(inputs, task parameters) from checked tensors; `requested` names the outputs asked for."""
        raise NotImplementedError

    def encode(self, results: list[Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- helpers --------------------------------------------------------------------------------

    @property
    def hf_config(self) -> Any:
        return getattr(getattr(self.served.task, "context", None), "hf_config", None)

    def config_default(self, key: str) -> Any:
        """A request parameter's default from config.pbtxt (parsed as the task parses it), or None."""
        return self.served.task.defaults().get(key)


TEXT = TensorSpec("TEXT", "BYTES", (-1,), doc="one UTF-8 text per input")


def check_tensors(signature: V2Signature, tensors: Sequence[tuple[str, str, Sequence[int]]]) -> int:
    """Checks the request's (name, datatype, shape) against the signature, before any decoding;
    returns the number of inputs (the first dimension, equal across tensors)."""
    expected = ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" + (" (optional)" if s.optional else "")
                         for s in signature.inputs)
    names = [name for name, _, _ in tensors]
    for name in names:
        if signature.input(name) is None:
            raise InvalidArgument(f"input {name}", f"is not an input of this model; its inputs: {expected}")
        if names.count(name) > 1:
            raise InvalidArgument(f"input {name}", "is sent more than once")
    for spec in signature.inputs:
        if spec.name not in names and not spec.optional:
            raise InvalidArgument(f"input {spec.name}", f"is required; this model's inputs: {expected}")
    rows = None
    for name, datatype, shape in tensors:
        spec = signature.input(name)
        assert spec is not None
        if datatype != spec.datatype:
            raise InvalidArgument(f"input {name}", f"datatype {datatype} does not match {spec.datatype}")
        shape = list(shape)
        if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise InvalidArgument(
                f"input {name}", f"shape {shape} does not match {list(spec.shape)} (-1: any size; the first "
                "dimension counts the request's inputs)")
        if rows is not None and shape[0] != rows:
            raise InvalidArgument(f"input {name}",
                                  f"has {shape[0]} rows but the other inputs have {rows}; send one row per input")
        rows = shape[0]
    return rows or 0


def _json_value(value: Any) -> Any:
    """What json.dumps cannot write itself: arrays and tensors as nested lists, numpy scalars as numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def check_parameters(signature: V2Signature, params: dict[str, Any], task: str) -> None:
    if signature.parameters is None:
        return
    for key in params:
        if key not in signature.parameters:
            allowed = ", ".join(sorted(signature.parameters)) or "none"
            raise InvalidArgument(f"parameters.{key}", f"is not a parameter of {task}; allowed: {allowed}")


def grid(rows: Sequence[Sequence[Any]], value: Any, fill: Any, dtype: Any) -> np.ndarray:
    """[n, k] from n rows of up to k items (ragged rows padded with `fill`); `value` maps an item."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        for j, item in enumerate(row):
            out[i, j] = value(item)
    return out


def utf8(text: Any) -> bytes:
    return str(text).encode("utf-8")


def text_list(value: Any) -> Any:
    """A list parameter sent as one string: a JSON array ('["a", "b"]') or comma-separated ('a, b')."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("parameters", f"{value!r} starts like a JSON array but is not one: {exc}") from None
    return [part.strip() for part in value.split(",") if part.strip()]


def int_or(value: Any, fill: int) -> int:
    return fill if value is None else int(value)


# -- the codecs -----------------------------------------------------------------------------------


class TextClassificationCodec(TaskCodec):
    """TEXT (and TEXT_PAIR) in; the top_k labels and their scores, best first, out."""

    task = "text-classification"
    TOP_K = "labels per input (default 1; 0: every label)"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TEXT, TensorSpec("TEXT_PAIR", "BYTES", (-1,), optional=True,
                                     doc="second text of each input (sentence pairs)")),
            outputs=self.label_outputs(),
            parameters={"top_k": self.TOP_K, "function_to_apply": "softmax, sigmoid, none or default (the model's)"},
        )

    @staticmethod
    def label_outputs() -> tuple[TensorSpec, ...]:
        return (
            TensorSpec("LABEL", "BYTES", (-1, -1), doc="labels per input, best first"),
            TensorSpec("SCORE", "FP32", (-1, -1), doc="their scores (NaN pads a shorter row)"),
        )

    def decode(self, tensors, params, requested):
        texts: list[Any] = utf8_strings(tensors["TEXT"], "TEXT")
        params = dict(params)
        if "TEXT_PAIR" in tensors:
            texts = list(zip(texts, utf8_strings(tensors["TEXT_PAIR"], "TEXT_PAIR")))
            params["has_text_pairs"] = True
        return texts, params

    def encode(self, results, params):
        return {
            "LABEL": grid(results, lambda e: utf8(e["label"]), b"", object),
            "SCORE": grid(results, lambda e: e["score"], np.nan, np.float32),
        }


class ImageClassificationCodec(TextClassificationCodec):
    """IMAGE (the bytes of an image file: PNG, JPEG, ...) in; the top_k labels and scores out."""

    task = "image-classification"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TensorSpec("IMAGE", "BYTES", (-1,), doc="one encoded image file (PNG, JPEG, ...) per input"),),
            outputs=self.label_outputs(),
            parameters={"top_k": "labels per input (default 5)", "function_to_apply": "softmax, sigmoid, none or default"},
        )

    def decode(self, tensors, params, requested):
        return [bytes(item) for item in tensors["IMAGE"].reshape(-1)], dict(params)


class ZeroShotClassificationCodec(TaskCodec):
    """TEXT in, scored against the candidate_labels parameter; every label and its score, best first, out."""

    task = "zero-shot-classification"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TEXT,),
            outputs=TextClassificationCodec.label_outputs(),
            parameters={
                "candidate_labels": "the labels, comma-separated or a JSON array (required)",
                "hypothesis_template": "the hypothesis each label fills, with {} for the label",
                "multi_label": "score each label on its own (default false)",
            },
        )

    def decode(self, tensors, params, requested):
        params = dict(params)
        if "candidate_labels" in params:
            params["candidate_labels"] = text_list(params["candidate_labels"])
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results, params):
        return {
            "LABEL": grid([r["labels"] for r in results], utf8, b"", object),
            "SCORE": grid([r["scores"] for r in results], float, np.nan, np.float32),
        }


class QuestionAnsweringCodec(TaskCodec):
    """QUESTION and CONTEXT in; the top_k answers with their scores and character spans out."""

    task = "question-answering"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(
                TensorSpec("QUESTION", "BYTES", (-1,), doc="one question per input"),
                TensorSpec("CONTEXT", "BYTES", (-1,), doc="the text to answer it from"),
            ),
            outputs=(
                TensorSpec("ANSWER", "BYTES", (-1, -1), doc="top_k answers per input, best first"),
                TensorSpec("SCORE", "FP32", (-1, -1), doc="their scores (NaN pads a shorter row)"),
                TensorSpec("START", "INT64", (-1, -1), doc="character where each answer starts in CONTEXT (-1 pads)"),
                TensorSpec("END", "INT64", (-1, -1), doc="character where it ends (-1 pads)"),
            ),
            parameters={
                "top_k": "answers per input (default 1)",
                "max_answer_len": "longest answer in tokens",
                "max_seq_len": "tokens per window of question and context",
                "doc_stride": "tokens shared by consecutive windows of a long context",
                "max_question_len": "longest question in tokens",
                "handle_impossible_answer": "allow the empty answer (default false)",
                "align_to_words": "snap answers to word boundaries (default true)",
            },
        )

    def decode(self, tensors, params, requested):
        questions = utf8_strings(tensors["QUESTION"], "QUESTION")
        contexts = utf8_strings(tensors["CONTEXT"], "CONTEXT")
        return list(zip(questions, contexts)), dict(params)

    def encode(self, results, params):
        rows = [r if isinstance(r, list) else [r] for r in results]
        return {
            "ANSWER": grid(rows, lambda a: utf8(a["answer"]), b"", object),
            "SCORE": grid(rows, lambda a: a["score"], np.nan, np.float32),
            "START": grid(rows, lambda a: a["start"], -1, np.int64),
            "END": grid(rows, lambda a: a["end"], -1, np.int64),
        }


class FillMaskCodec(TaskCodec):
    """TEXT with mask tokens in; per mask, the top_k fillers out, as [inputs, masks, top_k]."""

    task = "fill-mask"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TensorSpec("TEXT", "BYTES", (-1,), doc="one text per input, with the model's mask token"),),
            outputs=(
                TensorSpec("TOKEN_STR", "BYTES", (-1, -1, -1), doc="per input and mask, the top_k tokens, best first"),
                TensorSpec("SCORE", "FP32", (-1, -1, -1), doc="their probabilities (NaN pads)"),
                TensorSpec("TOKEN", "INT64", (-1, -1, -1), doc="their vocabulary ids (-1 pads)"),
                TensorSpec("SEQUENCE", "BYTES", (-1, -1, -1), doc="the text with the mask filled"),
            ),
            parameters={"top_k": "predictions per mask (default 5)",
                        "targets": "limit predictions to these words: comma-separated or a JSON array"},
        )

    def decode(self, tensors, params, requested):
        params = dict(params)
        if "targets" in params:
            params["targets"] = text_list(params["targets"])
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results, params):
        masks = max((len(r) for r in results), default=0)
        top_k = max((len(p) for r in results for p in r), default=0)

        def cube(value: Any, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full((len(results), masks, top_k), fill, dtype=dtype)
            for i, per_mask in enumerate(results):
                out[i, : len(per_mask)] = grid(per_mask, value, fill, dtype) if per_mask else fill
            return out

        return {
            "TOKEN_STR": cube(lambda p: utf8(p["token_str"]), b"", object),
            "SCORE": cube(lambda p: p["score"], np.nan, np.float32),
            "TOKEN": cube(lambda p: p["token"], -1, np.int64),
            "SEQUENCE": cube(lambda p: utf8(p["sequence"]), b"", object),
        }


class TokenClassificationCodec(TaskCodec):
    """TEXT in; each input's entities out, padded to the input with the most, and their count."""

    task = "token-classification"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TEXT,),
            outputs=(
                TensorSpec("ENTITY", "BYTES", (-1, -1), doc="label (or entity group) per entity, padded with empty"),
                TensorSpec("SCORE", "FP32", (-1, -1), doc="its score (NaN pads)"),
                TensorSpec("WORD", "BYTES", (-1, -1), doc="its text"),
                TensorSpec("START", "INT64", (-1, -1), doc="character where it starts (-1: unknown or padding)"),
                TensorSpec("END", "INT64", (-1, -1), doc="character where it ends (-1: unknown or padding)"),
                TensorSpec("INDEX", "INT64", (-1, -1), doc="its token index without aggregation (-1 otherwise)"),
                TensorSpec("ENTITY_COUNT", "INT64", (-1,), doc="entities per input"),
            ),
            parameters={
                "aggregation_strategy": "none, simple, first, average or max",
                "ignore_labels": "labels to leave out: comma-separated or a JSON array (default O)",
            },
        )

    def decode(self, tensors, params, requested):
        params = dict(params)
        if "ignore_labels" in params:
            params["ignore_labels"] = text_list(params["ignore_labels"])
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results, params):
        return {
            "ENTITY": grid(results, lambda e: utf8(e.get("entity_group", e.get("entity", ""))), b"", object),
            "SCORE": grid(results, lambda e: e["score"], np.nan, np.float32),
            "WORD": grid(results, lambda e: utf8(e.get("word", "")), b"", object),
            "START": grid(results, lambda e: int_or(e.get("start"), -1), -1, np.int64),
            "END": grid(results, lambda e: int_or(e.get("end"), -1), -1, np.int64),
            "INDEX": grid(results, lambda e: int_or(e.get("index"), -1), -1, np.int64),
            "ENTITY_COUNT": np.array([len(r) for r in results], dtype=np.int64),
        }


class FeatureExtractionCodec(TaskCodec):
    """TEXT in; a pooled EMBEDDING [n, d], or with pooling none the token embeddings, padded, out."""

    task = "feature-extraction"
    TOKEN_OUTPUTS = frozenset({"TOKEN_EMBEDDINGS", "TOKEN_COUNT"})

    def build_signature(self) -> V2Signature:
        d = int(getattr(self.hf_config, "hidden_size", 0) or -1)
        return V2Signature(
            inputs=(TEXT,),
            outputs=(
                TensorSpec("EMBEDDING", "FP32", (-1, d), doc="one pooled vector per input (pooling mean, cls or max)"),
                TensorSpec("TOKEN_EMBEDDINGS", "FP32", (-1, -1, d),
                           doc="with pooling none: each input's token vectors, zero-padded to the longest input"),
                TensorSpec("TOKEN_COUNT", "INT64", (-1,), doc="with pooling none: each input's number of tokens"),
            ),
            parameters={
                "pooling": "mean (the v2 default), cls, max, or none for token embeddings",
                "normalize": "L2-normalize each vector (default false)",
            },
        )

    def decode(self, tensors, params, requested):
        params = dict(params)
        if "pooling" not in params:
            if requested and requested <= self.TOKEN_OUTPUTS:
                params["pooling"] = "none"
            else:
                params["pooling"] = self.config_default("pooling") or "mean"
        pooled = params["pooling"] != "none"
        if pooled and requested & self.TOKEN_OUTPUTS:
            raise InvalidArgument("outputs", "TOKEN_EMBEDDINGS and TOKEN_COUNT come only with pooling none")
        if not pooled and "EMBEDDING" in requested:
            raise InvalidArgument("outputs", "EMBEDDING needs pooling mean, cls or max; "
                                  "with pooling none ask for TOKEN_EMBEDDINGS")
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results, params):
        arrays = [np.asarray(r, dtype=np.float32) for r in results]
        if arrays[0].ndim == 1:
            return {"EMBEDDING": np.stack(arrays)}
        longest = max(a.shape[0] for a in arrays)
        padded = np.zeros((len(arrays), longest, arrays[0].shape[-1]), dtype=np.float32)
        for i, a in enumerate(arrays):
            padded[i, : a.shape[0]] = a
        return {"TOKEN_EMBEDDINGS": padded, "TOKEN_COUNT": np.array([a.shape[0] for a in arrays], dtype=np.int64)}


SAMPLING_PARAMETERS = {
    "do_sample": "sample instead of greedy decoding",
    "temperature": "sampling temperature (> 0)",
    "top_k": "sample from the k likeliest tokens",
    "top_p": "sample from the smallest set of tokens with this much probability",
    "repetition_penalty": "penalty (> 1) for tokens already generated",
    "seed": "makes a sampled sequence reproducible",
}


class TextGenerationCodec(TaskCodec):
    """TEXT (prompts) in; the generated texts out, or over ModelStreamInfer, one response per
    batch of new tokens (Triton's decoupled models), the last with the finish reason."""

    task = "text-generation"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TensorSpec("TEXT", "BYTES", (-1,), doc="one prompt per input (streaming: one per request)"),),
            outputs=(
                TensorSpec("GENERATED_TEXT", "BYTES", (-1, -1),
                           doc="num_return_sequences texts per input; streaming: this response's new text, [1, 1]"),
                TensorSpec("FINISH_REASON", "BYTES", (-1, -1),
                           doc="length, eos, stop_sequence or cancelled; streaming: empty until the last response"),
                TensorSpec("GENERATED_TOKENS", "INT64", (-1, -1), doc="tokens generated per sequence"),
                TensorSpec("PROMPT_TOKENS", "INT64", (-1,), doc="tokens of each prompt"),
                TensorSpec("TOKEN_IDS", "INT64", (-1, -1), doc="streaming only: this response's new token ids, [1, k]"),
            ),
            parameters={
                **SAMPLING_PARAMETERS,
                "max_new_tokens": "new tokens at most",
                "max_length": "prompt and new tokens at most",
                "stop_sequences": "texts that end the sequence: comma-separated or a JSON array",
                "return_full_text": "prepend the prompt (default true)",
                "num_return_sequences": "sequences per prompt (sampling)",
                "stream": "ModelStreamInfer: a response per batch of new tokens (default true)",
            },
            decoupled=getattr(self.served, "engine", None) is not None,
        )

    def decode(self, tensors, params, requested):
        params = dict(params)
        if "stop_sequences" in params:
            params["stop_sequences"] = text_list(params["stop_sequences"])
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results, params):
        return {
            "GENERATED_TEXT": grid(results, lambda r: utf8(r["generated_text"]), b"", object),
            "FINISH_REASON": grid(results, lambda r: utf8(r["finish_reason"]), b"", object),
            "GENERATED_TOKENS": grid(results, lambda r: r["generated_tokens"], -1, np.int64),
            "PROMPT_TOKENS": np.array([r[0]["prompt_tokens"] if r else 0 for r in results], dtype=np.int64),
        }

    def encode_event(self, event: Any) -> dict[str, np.ndarray]:
        """One streamed response: the new text and tokens; the last also the finish reason and counts."""
        reason = event.finish_reason
        arrays = {
            "GENERATED_TEXT": np.array([[utf8(event.text)]], dtype=object),
            "TOKEN_IDS": np.array([list(event.token_ids)], dtype=np.int64).reshape(1, -1),
            "FINISH_REASON": np.array([[utf8(getattr(reason, "value", reason) if reason is not None else "")]],
                                      dtype=object),
        }
        if reason is not None:
            arrays["GENERATED_TOKENS"] = np.array([[event.generated_tokens]], dtype=np.int64)
            arrays["PROMPT_TOKENS"] = np.array([event.prompt_tokens], dtype=np.int64)
        return arrays


class Text2TextCodec(TaskCodec):
    """TEXT in; num_return_sequences texts per input out, named by the task's result
    (SUMMARY_TEXT for summarization, TRANSLATION_TEXT for translation)."""

    task = "summarization"
    LANGUAGES = {"src_lang": "source language (translation)", "tgt_lang": "target language (translation)"}

    @property
    def result_key(self) -> str:
        return getattr(self.served.task, "result_key", "generated_text")

    def build_signature(self) -> V2Signature:
        parameters = {
            **SAMPLING_PARAMETERS,
            "max_new_tokens": "new tokens at most",
            "max_length": "tokens at most",
            "min_length": "tokens at least",
            "num_beams": "beam search width",
            "no_repeat_ngram_size": "forbid repeating n-grams of this size",
            "early_stopping": "stop beam search early",
            "length_penalty": "beam search length penalty",
            "num_return_sequences": "texts per input",
            "clean_up_tokenization_spaces": "remove spaces before punctuation",
        }
        if self.result_key == "translation_text":
            parameters.update(self.LANGUAGES)
        return V2Signature(
            inputs=(TEXT,),
            outputs=(TensorSpec(self.result_key.upper(), "BYTES", (-1, -1), doc="num_return_sequences texts per input"),),
            parameters=parameters,
        )

    def decode(self, tensors, params, requested):
        return utf8_strings(tensors["TEXT"], "TEXT"), dict(params)

    def encode(self, results, params):
        key = self.result_key
        return {key.upper(): grid([r if isinstance(r, list) else [r] for r in results], lambda r: utf8(r[key]), b"",
                                  object)}


class TranslationCodec(Text2TextCodec):
    task = "translation"


class GenericCodec(TaskCodec):
    """Any task without a codec of its own: its inputs as TEXT or JSON, its results as JSON text.

    Request parameters go to the task as sent; the results are transformers' Python objects,
    written as one JSON document per input.
    """

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(
                TensorSpec("TEXT", "BYTES", (-1,), optional=True, doc="one UTF-8 text per input (or send JSON)"),
                TensorSpec("JSON", "BYTES", (-1,), optional=True, doc="one JSON document per input, for structured inputs"),
            ),
            outputs=(TensorSpec("JSON", "BYTES", (-1,), doc="one JSON document per input: the task's result"),),
            parameters=None,
        )

    def decode(self, tensors, params, requested):
        if ("TEXT" in tensors) == ("JSON" in tensors):
            raise InvalidArgument("inputs", "send exactly one of TEXT or JSON")
        if "TEXT" in tensors:
            return utf8_strings(tensors["TEXT"], "TEXT"), dict(params)
        inputs = []
        for i, text in enumerate(utf8_strings(tensors["JSON"], "JSON")):
            try:
                inputs.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"input JSON[{i}]", f"is not JSON: {exc}") from None
        return inputs, dict(params)

    def encode(self, results, params):
        docs = np.empty(len(results), dtype=object)
        docs[:] = [json.dumps(r, default=_json_value).encode("utf-8") for r in results]
        return {"JSON": docs}


# Codecs by the task name they serve; a task class finds its codec through its bases.
CODECS: dict[str, type[TaskCodec]] = {c.task: c for c in (
    TextClassificationCodec, FeatureExtractionCodec, TokenClassificationCodec, QuestionAnsweringCodec, FillMaskCodec,
    ZeroShotClassificationCodec, ImageClassificationCodec, TextGenerationCodec, Text2TextCodec, TranslationCodec,
)}

_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def codec_class(task_class: type) -> type[TaskCodec]:
    for cls in task_class.__mro__:
        name = vars(cls).get("name")
        if name in CODECS:
            return CODECS[name]
    return GenericCodec


def codec_for(served: Any) -> TaskCodec:
    """The codec of a loaded model version (built once per version)."""
    codec = _cache.get(served)
    if codec is None:
        codec = _cache[served] = codec_class(type(served.task))(served)
    return codec

