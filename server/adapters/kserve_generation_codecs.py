"""v2 tensors of the generating tasks: text-generation (streamed as Triton's decoupled models) and
the text-to-text tasks, summarization and translation."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeserve.server.adapters.kserve_signature import TEXT, TaskCodec, TensorSpec, V2Signature, grid, utf8

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
    list_parameters = ("stop_sequences",)

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
            decoupled=self.model.streams,
        )

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

    def build_signature(self) -> V2Signature:
        key = self.model.result_key
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
        if key == "translation_text":
            parameters.update(self.LANGUAGES)
        return V2Signature(
            inputs=(TEXT,),
            outputs=(TensorSpec(key.upper(), "BYTES", (-1, -1), doc="num_return_sequences texts per input"),),
            parameters=parameters,
        )

    def encode(self, results, params):
        key = self.model.result_key
        return {key.upper(): grid([r if isinstance(r, list) else [r] for r in results], lambda r: utf8(r[key]), b"",
                                  object)}


class TranslationCodec(Text2TextCodec):
    task = "translation"
