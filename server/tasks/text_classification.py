"""text-classification (alias sentiment-analysis), with transformers' scoring and output rules."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.base import TaskParams, TokenizingTask, check_int
from pipeserve.server.tasks.class_labels import class_labels, default_score_function

FUNCTIONS = ("default", "softmax", "sigmoid", "none")


@dataclass(frozen=True)
class ClassificationPost:
    function: str  # softmax | sigmoid | none
    top_k: int | None  # None: every label


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


def rank_labels(logits: np.ndarray, labels: Sequence[str], function: str, top_k: int | None) -> list[dict[str, Any]]:
    """Scores one row of logits (softmax, sigmoid or none) and returns its labels best first,
    the top_k of them (every label for None), as transformers' classification pipelines do."""
    if function == "softmax":
        scores = softmax(logits)
    elif function == "sigmoid":
        scores = sigmoid(logits)
    else:
        scores = logits
    ranked = sorted(({"label": labels[i], "score": float(s)} for i, s in enumerate(scores)),
                    key=lambda d: d["score"], reverse=True)
    return ranked[:top_k]


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
        params = self.with_defaults(params)
        function = checked_function_to_apply(params, self.default_function)
        top_k = params.get("top_k", 1)
        if top_k is not None:
            top_k = check_int("top_k", top_k, 0) or None  # 0 means every label, as None does
        has_pairs = bool(params.get("has_text_pairs"))
        return TaskParams(pre=has_pairs, post=ClassificationPost(function, top_k))

    def size(self, item: Any) -> int:
        return len(item[0]) + len(item[1] or "") if isinstance(item, tuple) else len(item)

    def check_input(self, index: int, item: Any) -> None:
        text = item[0] if isinstance(item, tuple) else item
        if not isinstance(text, str):
            raise InvalidArgument(f"inputs[{index}]", "must be a string")

    def preprocess(self, inputs: Sequence[Any], pre: Hashable) -> Any:
        if pre:  # sentence pairs
            return self.tokenize([t for t, _ in inputs], [p for _, p in inputs])
        return self.tokenize(inputs)

    def postprocess(self, inputs, features, outputs, posts: Sequence[ClassificationPost]) -> list[Any]:
        logits = outputs["logits"].float().numpy()
        return [rank_labels(row, self.labels, post.function, post.top_k) for row, post in zip(logits, posts)]
