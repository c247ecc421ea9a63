"""v2 tensors of the classifiers: text, image and zero-shot classification (ranked LABEL and
SCORE), and token classification (entities)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeserve.server.adapters.kserve_signature import TEXT, TaskCodec, TensorSpec, V2Signature, grid, int_or, utf8
from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.errors import InvalidArgument

LABEL_OUTPUTS = (
    TensorSpec("LABEL", "BYTES", (-1, -1), doc="labels per input, best first"),
    TensorSpec("SCORE", "FP32", (-1, -1), doc="their scores (NaN pads a shorter row)"),
)


def ranked_labels(rows: Sequence[Sequence[tuple[str, float]]]) -> dict[str, np.ndarray]:
    """LABEL and SCORE from each input's (label, score) pairs, best first."""
    return {
        "LABEL": grid(rows, lambda pair: utf8(pair[0]), b"", object),
        "SCORE": grid(rows, lambda pair: pair[1], np.nan, np.float32),
    }


# transformers' tokenizer arguments, as text-classification, fill-mask and feature-extraction take them.
TOKENIZER_PARAMETERS = {
    "truncation": "true, false, longest_first, only_first, only_second or do_not_truncate "
                  "(default: the model's policy, cut to its maximum)",
    "max_length": "tokens to cut each input to (at most the model's maximum; truncates longest_first by itself)",
    "add_special_tokens": "add the model's special tokens (default true)",
}


class TextClassificationCodec(TaskCodec):
    """TEXT (and TEXT_PAIR) in; the top_k labels and their scores, best first, out."""

    task = "text-classification"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TEXT, TensorSpec("TEXT_PAIR", "BYTES", (-1,), optional=True,
                                     doc="second text of each input (sentence pairs); empty: that input has none")),
            outputs=LABEL_OUTPUTS,
            parameters={"top_k": "labels per input (default 1; 0: every label)",
                        "function_to_apply": "softmax, sigmoid, none or default (the model's)",
                        "return_all_scores": "without top_k, every label in the model's order (transformers 4.x)",
                        **TOKENIZER_PARAMETERS},
        )

    def decode(self, tensors, params, requested):
        texts, params = super().decode(tensors, params, requested)
        if "TEXT_PAIR" in tensors:
            pairs = utf8_strings(tensors["TEXT_PAIR"], "TEXT_PAIR")
            texts = [(text, pair) if pair else text for text, pair in zip(texts, pairs)]
        return texts, params

    def encode(self, results, params):
        return ranked_labels([[(e["label"], e["score"]) for e in r] for r in results])


class ImageClassificationCodec(TextClassificationCodec):
    """IMAGE (the bytes of an image file: PNG, JPEG, ...) in; the top_k labels and scores out."""

    task = "image-classification"

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TensorSpec("IMAGE", "BYTES", (-1,), doc="one encoded image file (PNG, JPEG, ...) per input"),),
            outputs=LABEL_OUTPUTS,
            parameters={"top_k": "labels per input (default 5)", "function_to_apply": "softmax, sigmoid, none or default"},
        )

    def decode(self, tensors, params, requested):
        return [bytes(item) for item in tensors["IMAGE"].reshape(-1)], dict(params)


class ZeroShotClassificationCodec(TaskCodec):
    """TEXT in, scored against the candidate_labels parameter; every label and its score, best first, out."""

    task = "zero-shot-classification"
    list_parameters = ("candidate_labels",)

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TEXT,),
            outputs=LABEL_OUTPUTS,
            parameters={
                "candidate_labels": "the labels, comma-separated or a JSON array (required)",
                "hypothesis_template": "the hypothesis each label fills, with {} for the label",
                "multi_label": "score each label on its own (default false)",
            },
        )

    def encode(self, results, params):
        return ranked_labels([list(zip(r["labels"], r["scores"])) for r in results])


class TokenClassificationCodec(TaskCodec):
    """TEXT (or WORDS) in; each input's entities out, padded to the input with the most, and their count."""

    task = "token-classification"
    list_parameters = ("ignore_labels",)

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(
                TensorSpec("TEXT", "BYTES", (-1,), optional=True, doc="one UTF-8 text per input (or send WORDS)"),
                TensorSpec("WORDS", "BYTES", (-1, -1), optional=True,
                           doc="each input split into words (is_split_into_words), padded with empty strings; "
                               "instead of TEXT"),
                TensorSpec("OFFSET_MAPPING", "INT64", (-1, -1, 2), optional=True,
                           doc="each input's token spans [start, end) (special tokens included), padded with [-1, -1]"),
            ),
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
                "delimiter": "what joins the WORDS of an input into its text (default a space)",
                "stride": "label texts longer than the model in overlapping windows sharing this many tokens",
            },
        )

    def decode(self, tensors, params, requested):
        params = self.parameters(params)
        if ("TEXT" in tensors) == ("WORDS" in tensors):
            raise InvalidArgument("inputs", "send exactly one of TEXT or WORDS")
        if "TEXT" in tensors:
            inputs: list = utf8_strings(tensors["TEXT"], "TEXT")
        else:
            words = tensors["WORDS"]
            rows = utf8_strings(words.reshape(-1), "WORDS")
            width = words.shape[1]
            inputs = [_unpadded(rows[i * width : (i + 1) * width], "") for i in range(words.shape[0])]
            params["is_split_into_words"] = True
        if "OFFSET_MAPPING" in tensors:
            spans = tensors["OFFSET_MAPPING"]
            inputs = [{"input": item, "offset_mapping": _unpadded([(int(a), int(b)) for a, b in row], (-1, -1))}
                      for item, row in zip(inputs, spans)]
        return inputs, params

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


def _unpadded(row: list, pad: object) -> list:
    """A row of a padded tensor without its trailing padding."""
    end = len(row)
    while end and row[end - 1] == pad:
        end -= 1
    return row[:end]
