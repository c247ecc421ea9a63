"""v2 tensors of the other encoder tasks over text: question answering (spans), fill-mask
(fillers per mask) and feature extraction (embeddings)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeserve.server.adapters.kserve_classification_codecs import TOKENIZER_PARAMETERS
from pipeserve.server.adapters.kserve_signature import TEXT, TaskCodec, TensorSpec, V2Signature, grid, utf8
from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.errors import InvalidArgument


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
    list_parameters = ("targets",)

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(TensorSpec("TEXT", "BYTES", (-1,), doc="one text per input, with the model's mask token"),),
            outputs=(
                TensorSpec("TOKEN_STR", "BYTES", (-1, -1, -1), doc="per input and mask, the top_k tokens, best first"),
                TensorSpec("SCORE", "FP32", (-1, -1, -1), doc="their probabilities (NaN pads)"),
                TensorSpec("TOKEN", "INT64", (-1, -1, -1), doc="their vocabulary ids (-1 pads)"),
                TensorSpec("SEQUENCE", "BYTES", (-1, -1, -1), doc="the text with the mask filled"),
            ),
            parameters={"top_k": "predictions per mask (default 5; 0: none)",
                        "targets": "limit predictions to these words: comma-separated or a JSON array",
                        **TOKENIZER_PARAMETERS},
        )

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


class FeatureExtractionCodec(TaskCodec):
    """TEXT in; a pooled EMBEDDING [n, d], or with pooling none the token embeddings, padded, out."""

    task = "feature-extraction"
    TOKEN_OUTPUTS = frozenset({"TOKEN_EMBEDDINGS", "TOKEN_COUNT"})

    def build_signature(self) -> V2Signature:
        d = self.model.hidden_size or -1
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
                **TOKENIZER_PARAMETERS,
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
        arrays = [np.asarray(r.vector, dtype=np.float32) for r in results]
        if arrays[0].ndim == 1:
            return {"EMBEDDING": np.stack(arrays)}
        longest = max(a.shape[0] for a in arrays)
        padded = np.zeros((len(arrays), longest, arrays[0].shape[-1]), dtype=np.float32)
        for i, a in enumerate(arrays):
            padded[i, : a.shape[0]] = a
        return {"TOKEN_EMBEDDINGS": padded, "TOKEN_COUNT": np.array([a.shape[0] for a in arrays], dtype=np.int64)}
