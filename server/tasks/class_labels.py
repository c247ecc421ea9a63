"""What a classifier's outputs are called, and how transformers' pipelines score them by default."""

from __future__ import annotations

from typing import Any

from pipeserve.server.tasks.base import TaskContext


def class_labels(context: TaskContext) -> list[str]:
    """The labels of the model's output classes, in order: config.pbtxt's `parameters.labels`, or
    the transformers config's id2label."""
    labels = list(context.settings.labels)
    if not labels:
        id2label = getattr(context.hf_config, "id2label", None) or {}
        labels = [id2label[i] for i in sorted(id2label)]
    return labels


def default_score_function(hf_config: Any, num_labels: int) -> str:
    """transformers' pipeline default for function_to_apply: regression gets raw scores, one label
    or multi-label problems a sigmoid, the rest a softmax."""
    problem = getattr(hf_config, "problem_type", None)
    if problem == "regression":
        return "none"
    if problem == "multi_label_classification" or num_labels == 1:
        return "sigmoid"
    return "softmax"
