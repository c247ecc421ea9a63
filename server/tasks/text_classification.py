"""text-classification (alias sentiment-analysis), with transformers' scoring and output rules.

An input is a text, or a (text, text_pair) tuple for sentence-pair models (an empty text_pair is
none); a batch may mix both.
Parameters, with transformers' names: top_k (None or 0: every label), function_to_apply,
return_all_scores (transformers 4.x's: every label in the model's label order, where top_k is not
given) and the tokenizer's truncation, max_length and add_special_tokens (tokenization.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.class_labels import class_labels, default_score_function
from pipeserve.server.tasks.tokenization import TokenizerOptions, tokenize, tokenizer_options

FUNCTIONS = ("default", "softmax", "sigmoid", "none")


@dataclass(frozen=True)
class ClassificationPost:
    function: str  # softmax | sigmoid | none
    top_k: int | None  # None: every label
    # False: the labels in the model's order, unranked (transformers 4.x's return_all_scores).
    ranked: bool = True


def softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def checked_function_to_apply(params: dict[str, Any], default: str) -> str:
    """The request's `function_to_apply`, checked; "default" (or none) is the model's `default`."""
    function = params.get("function_to_apply") or "default"
    if function not in FUNCTIONS:
        raise InvalidArgument("function_to_apply", f"must be one of {', '.join(FUNCTIONS)}, got {function!r}")
    return default if function == "default" else function


def rank_labels(logits: np.ndarray, labels: Sequence[str], function: str, top_k: int | None,
                ranked: bool = True) -> list[dict[str, Any]]:
    """Scores one row of logits (softmax, sigmoid or none) and returns its labels best first,
    the top_k of them (every label for None), as transformers' classification pipelines do;
    unranked, every label in the model's order."""
    if function == "softmax":
        scores = softmax(logits)
    elif function == "sigmoid":
        scores = sigmoid(logits)
    else:
        scores = logits
    scored = [{"label": labels[i], "score": float(s)} for i, s in enumerate(scores)]
    if not ranked:
        return scored
    return sorted(scored, key=lambda d: d["score"], reverse=True)[:top_k]


class TextClassificationTask(TokenizingTask):
    name = "text-classification"
    aliases = ("sentiment-analysis",)
    model_class = "AutoModelForSequenceClassification"
    output_names = ("logits",)

    def __init__(self, context):
        super().__init__(context)
        self.labels = class_labels(context)
        num_labels = getattr(context.hf_config, "num_labels", len(self.labels))
        self.default_function = default_score_function(context.hf_config, num_labels)

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        asked_top_k = params.get("top_k") is not None
        params = self.with_defaults(params)
        function = checked_function_to_apply(params, self.default_function)
        top_k = params.get("top_k", 1)
        if top_k is not None:
            top_k = check_int("top_k", top_k, 0) or None  # 0 means every label, as None does
        all_scores = params.get("return_all_scores", False)
        if not isinstance(all_scores, bool):
            raise InvalidArgument("return_all_scores", f"must be a boolean, got {all_scores!r}")
        # As in transformers 4.x, return_all_scores counts only where top_k is not given.
        ranked = asked_top_k or not all_scores
        return TaskParams(pre=tokenizer_options(params, self.max_length),
                          post=ClassificationPost(function, top_k if ranked else None, ranked))

    def size(self, item: Any) -> int:
        return len(item[0]) + len(item[1]) if isinstance(item, tuple) else len(item)

    def check_input(self, index: int, item: Any) -> None:
        if isinstance(item, tuple):
            if len(item) != 2 or not all(isinstance(text, str) for text in item):
                raise InvalidArgument(f"inputs[{index}]", "must be a text or a (text, text_pair) pair of strings")
        elif not isinstance(item, str):
            raise InvalidArgument(f"inputs[{index}]", "must be a string")

    def preprocess(self, inputs: Sequence[Any], pre: TokenizerOptions) -> Any:
        texts = [item[0] if isinstance(item, tuple) else item for item in inputs]
        # An empty text_pair is none, as on the wire (text_pairs holds "" for the inputs without one).
        pairs = [item[1] or None if isinstance(item, tuple) else None for item in inputs]
        return tokenize(self, texts, pairs, pre)

    def postprocess(self, inputs, features, outputs, posts: Sequence[ClassificationPost]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        return [rank_labels(row, self.labels, post.function, post.top_k, post.ranked) for row, post in zip(logits, posts)]
