"""zero-shot-classification: transformers 5's call shapes and results.

    classify("text", candidate_labels=["a", "b"])   -> {sequence, labels, scores}
    classify("text", "a, b")                        -> the labels as the second positional argument
    classify(["t1", "t2"], candidate_labels=[...])  -> one result per input
"""

from __future__ import annotations

import string
from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable
from pipeserve.v1 import zero_shot_classification_pb2 as pb
from pipeserve.v1 import zero_shot_classification_pb2_grpc as pb_grpc

PARAMETERS = ParameterTable(
    served={
        "candidate_labels": "the labels: a list, or one string of comma-separated labels",
        "hypothesis_template": "the NLI hypothesis each label fills, with {} for the label "
                               "(default 'This example is {}.')",
        "multi_label": "score each label on its own (entailment against contradiction)",
    },
).merged(CALL_OPTIONS)


class ZeroShotClassificationCodec(TaskCodec):
    task = "zero-shot-classification"
    stub = pb_grpc.ZeroShotClassificationServiceStub
    method = "ClassifyZeroShot"
    parameters = PARAMETERS

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if not args and "sequences" in params:
            params = dict(params)
            args = (params.pop("sequences"),)
        # transformers also takes the labels as the second positional argument.
        if len(args) == 2 and "candidate_labels" not in params:
            return args[0], {**params, "candidate_labels": args[1]}
        if len(args) > 1:
            raise ValueError(f"Unable to understand extra arguments {args[1:]}")
        return super().call_arguments(args, params)

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyZeroShotRequest:
        served = PARAMETERS.check(self.task, params)
        items, _ = as_list(inputs)
        if not all(isinstance(item, str) for item in items):
            raise TypeError("zero-shot-classification takes a text or a list of texts")
        labels = served.get("candidate_labels") or []
        if isinstance(labels, str):  # "a, b, c"
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
            raise TypeError("candidate_labels must be a string or a list of strings")
        if not labels or not items:
            raise ValueError("You must include at least one label and at least one sequence.")
        template = served.get("hypothesis_template")
        if template is not None and (not isinstance(template, str) or not _has_field(template)):
            raise ValueError(f'The provided hypothesis_template "{template}" was not able to be formatted with the '
                             "target labels. Make sure the passed template includes formatting syntax such as {} "
                             "where the label should go.")
        return pb.ClassifyZeroShotRequest(
            model=self.model, inputs=items, candidate_labels=list(labels),
            hypothesis_template=template or "", multi_label=bool(served.get("multi_label", False)),
        )

    def shape(self, response: pb.ClassifyZeroShotResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = [{"sequence": r.sequence, "labels": list(r.labels), "scores": list(r.scores)} for r in response.results]
        _, single = as_list(inputs)
        return outputs[0] if single else outputs


def _has_field(template: str) -> bool:
    """Whether the template has a {} for the label (the server checks the rest; formatting it here
    could let a template such as "{:>999999999}" take gigabytes)."""
    try:
        return any(name is not None for _, name, _, _ in string.Formatter().parse(template))
    except ValueError:
        return True  # malformed: the server says how
