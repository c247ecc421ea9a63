"""v2 tensors of the generating tasks: text-generation (streamed as Triton's decoupled models) and
the text-to-text tasks, summarization and translation.

Every parameter the typed services take is a v2 request parameter of the same name; v2 parameters
are scalars, so the list and object ones (bad_words_ids, sequence_bias, tools, documents,
generation_config, ...) travel as JSON text. The task checks them all.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeserve.server.adapters.kserve_signature import TEXT, TaskCodec, TensorSpec, V2Signature, grid, utf8
from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks import generation_params as served
from pipeserve.server.tasks import text2text, text_generation

SAMPLING_PARAMETERS = {
    "do_sample": "sample instead of greedy decoding",
    "temperature": "sampling temperature (> 0)",
    "top_k": "sample from the k likeliest tokens",
    "top_p": "sample from the smallest set of tokens with this much probability",
    "repetition_penalty": "penalty (> 1) for tokens already generated",
    "seed": "makes a sampled sequence reproducible",
}
_DOCS = {
    **SAMPLING_PARAMETERS,
    "max_new_tokens": "new tokens at most",
    "max_length": "prompt and new tokens at most",
    "min_length": "no end-of-sequence token before this length",
    "min_new_tokens": "no end-of-sequence token before this many new tokens",
    "num_beams": "beam search width (whole-sequence generation)",
    "num_return_sequences": "sequences per input (sampling, or up to num_beams)",
    "no_repeat_ngram_size": "forbid repeating n-grams of this size",
    "early_stopping": "stop beam search early (true, false or never)",
    "length_penalty": "beam search length penalty",
    "bad_words_ids": "token sequences never completed: a JSON list of lists",
    "sequence_bias": "[[token ids, bias], ...] as JSON",
    "suppress_tokens": "tokens never generated: a JSON list",
    "eos_token_id": "end-of-sequence token(s): a number or a JSON list",
    "stop_sequences": "texts that end the text right after them: comma-separated or a JSON array",
    "return_full_text": "prepend the prompt (default true)",
    "tools": "tools the chat template shows (JSON list of schemas)",
    "documents": "documents the chat template shows (JSON list)",
    "tokenizer_encode_kwargs": "tokenizer or chat template options (JSON object)",
    "generation_config": "GenerationConfig fields (JSON object)",
    "clean_up_tokenization_spaces": "remove spaces before punctuation",
    "stream": "ModelStreamInfer: a response per batch of new tokens (default true)",
}
# Parameters whose values are lists or objects: JSON text on the wire.
_JSON_PARAMETERS = frozenset({
    "bad_words_ids", "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "eos_token_id",
    "forced_eos_token_id", "exponential_decay_length_penalty", "negative_prompt_ids",
    "negative_prompt_attention_mask", "watermarking_config", "generation_config", "tools", "documents",
    "tokenizer_encode_kwargs", "stop_sequence", "stop_strings",
})


def _parameters(names: frozenset[str] | set[str]) -> dict[str, str]:
    """Every parameter the task knows (served, without effect, or refused with its reason by the task)."""
    known = names | set(served.GENERATE_PARAMETERS) | set(served.NO_EFFECT) | set(served.REFUSED) | {"seed"}
    return {name: _DOCS.get(name, "as transformers names it (see the README's parameter table)")
            for name in sorted(known)}


def _json_parameters(params: dict[str, Any]) -> dict[str, Any]:
    out = dict(params)
    for key in _JSON_PARAMETERS:
        value = out.get(key)
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"parameters.{key}", f"starts like JSON but is not JSON: {exc}") from None
    return out


def _token_grid(results: list[list[dict[str, Any]]], key: str) -> np.ndarray:
    """[inputs, sequences, tokens] of each sequence's `key` ids, -1 padding ragged rows."""
    width = max((len(r) for r in results), default=0)
    length = max((len(s.get(key) or ()) for r in results for s in r), default=0)
    out = np.full((len(results), width, length), -1, dtype=np.int64)
    for i, per_input in enumerate(results):
        for j, sequence in enumerate(per_input):
            ids = sequence.get(key) or ()
            out[i, j, : len(ids)] = ids
    return out


class TextGenerationCodec(TaskCodec):
    """TEXT (prompts) or MESSAGES (conversations, JSON) in; the generated texts out, or over
    ModelStreamInfer, one response per batch of new tokens (Triton's decoupled models), the last
    with the finish reason."""

    task = "text-generation"
    list_parameters = ("stop_sequences",)

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(
                TensorSpec("TEXT", "BYTES", (-1,), optional=True,
                           doc="one prompt per input (streaming: one per request)"),
                TensorSpec("MESSAGES", "BYTES", (-1,), optional=True,
                           doc="instead of TEXT: one conversation per input, a JSON list of {role, content} messages; "
                               "the model's chat template makes it a prompt"),
            ),
            outputs=(
                TensorSpec("GENERATED_TEXT", "BYTES", (-1, -1),
                           doc="num_return_sequences texts per input (a conversation's: the reply); streaming: this "
                               "response's new text, [1, 1]"),
                TensorSpec("FINISH_REASON", "BYTES", (-1, -1),
                           doc="length, eos, stop_sequence or cancelled; streaming: empty until the last response"),
                TensorSpec("GENERATED_TOKENS", "INT64", (-1, -1), doc="tokens generated per sequence"),
                TensorSpec("PROMPT_TOKENS", "INT64", (-1,), doc="tokens of each prompt"),
                TensorSpec("TOKEN_IDS", "INT64", (-1, -1), doc="streaming only: this response's new token ids, [1, k]"),
                TensorSpec("CONVERSATION", "BYTES", (-1, -1),
                           doc="MESSAGES with return_full_text: the conversation with the reply, JSON, per sequence"),
                TensorSpec("GENERATED_TOKEN_IDS", "INT64", (-1, -1, -1),
                           doc="with return_tensors: prompt and new token ids per sequence (-1 pads)"),
            ),
            parameters=_parameters(text_generation.PIPELINE_PARAMETERS | text_generation.PIPESERVE_PARAMETERS
                                   | {"num_return_sequences", "stream"}),
            decoupled=self.model.streams,
        )

    def decode(self, tensors, params, requested):
        params = _json_parameters(self.parameters(params))
        if ("TEXT" in tensors) == ("MESSAGES" in tensors):
            raise InvalidArgument("inputs", "send exactly one of TEXT (prompts) or MESSAGES (conversations)")
        if "TEXT" in tensors:
            return utf8_strings(tensors["TEXT"], "TEXT"), params
        conversations = []
        for i, text in enumerate(utf8_strings(tensors["MESSAGES"], "MESSAGES")):
            try:
                conversations.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"input MESSAGES[{i}]", f"is not JSON: {exc}") from None
        return conversations, params

    def encode(self, results, params):
        def text(r: dict[str, Any]) -> bytes:
            value = r.get("generated_text", "")
            if isinstance(value, list):
                value = value[-1].get("content", "") if value else ""
            return utf8(value if isinstance(value, str) else json.dumps(value))

        arrays = {
            "GENERATED_TEXT": grid(results, text, b"", object),
            "FINISH_REASON": grid(results, lambda r: utf8(r["finish_reason"]), b"", object),
            "GENERATED_TOKENS": grid(results, lambda r: r["generated_tokens"], -1, np.int64),
            "PROMPT_TOKENS": np.array([r[0]["prompt_tokens"] if r else 0 for r in results], dtype=np.int64),
        }
        if any(isinstance(s.get("generated_text"), list) for r in results for s in r):
            arrays["CONVERSATION"] = grid(results, lambda r: utf8(json.dumps(r.get("generated_text"))), b"", object)
        if any("generated_token_ids" in s for r in results for s in r):
            arrays["GENERATED_TOKEN_IDS"] = _token_grid(results, "generated_token_ids")
        return arrays

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
    (SUMMARY_TEXT for summarization, TRANSLATION_TEXT for translation), or their token ids with
    return_tensors."""

    task = "summarization"
    LANGUAGES = {"src_lang": "source language (translation)", "tgt_lang": "target language (translation)"}

    def build_signature(self) -> V2Signature:
        key = self.model.result_key
        names = set(text2text.PIPELINE_PARAMETERS)
        if key == "translation_text":
            names |= {"src_lang", "tgt_lang", "task"}
        parameters = _parameters(names)
        if key == "translation_text":
            parameters.update(self.LANGUAGES)
        ids_key = key.removesuffix("_text") + "_token_ids"
        return V2Signature(
            inputs=(TEXT,),
            outputs=(
                TensorSpec(key.upper(), "BYTES", (-1, -1), doc="num_return_sequences texts per input"),
                TensorSpec(ids_key.upper(), "INT64", (-1, -1, -1),
                           doc="with return_tensors: each output's token ids (-1 pads)"),
            ),
            parameters=parameters,
        )

    def decode(self, tensors, params, requested):
        return utf8_strings(tensors["TEXT"], "TEXT"), _json_parameters(self.parameters(params))

    def encode(self, results, params):
        key = self.model.result_key
        ids_key = key.removesuffix("_text") + "_token_ids"
        rows = [r if isinstance(r, list) else [r] for r in results]
        if any(ids_key in s for r in rows for s in r):
            return {ids_key.upper(): _token_grid(rows, ids_key)}
        return {key.upper(): grid(rows, lambda r: utf8(r[key]), b"", object)}


class TranslationCodec(Text2TextCodec):
    task = "translation"

