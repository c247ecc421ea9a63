from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import zero_shot_classification_pb2 as pb
from pipeserve.v1 import zero_shot_classification_pb2_grpc as pb_grpc


class ZeroShotClassificationCodec(TaskCodec):
    task = "zero-shot-classification"
    stub = pb_grpc.ZeroShotClassificationServiceStub
    method = "ClassifyZeroShot"

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        # transformers also takes the labels as the second positional argument.
        if len(args) == 2 and "candidate_labels" not in params:
            return args[0], {**params, "candidate_labels": args[1]}
        if not args and "sequences" in params:
            params = dict(params)
            return params.pop("sequences"), params
        return super().call_arguments(args, params)

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyZeroShotRequest:
        items, _ = as_list(inputs)
        labels = params.get("candidate_labels") or []
        if isinstance(labels, str):  # "a, b, c"
            labels = [label.strip() for label in labels.split(",") if label.strip()]
        return pb.ClassifyZeroShotRequest(
            model=self.model, inputs=items, candidate_labels=list(labels),
            hypothesis_template=params.get("hypothesis_template") or "",
            multi_label=bool(params.get("multi_label", False)),
        )

    def shape(self, response: pb.ClassifyZeroShotResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = [{"sequence": r.sequence, "labels": list(r.labels), "scores": list(r.scores)} for r in response.results]
        _, single = as_list(inputs)
        return outputs[0] if single else outputs
