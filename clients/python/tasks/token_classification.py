from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import token_classification_pb2 as pb
from pipeserve.v1 import token_classification_pb2_grpc as pb_grpc

_STRATEGIES = {None: 0, "none": 1, "simple": 2, "first": 3, "average": 4, "max": 5}


class TokenClassificationCodec(TaskCodec):
    task = "token-classification"
    aliases = ("ner",)
    stub = pb_grpc.TokenClassificationServiceStub
    method = "ClassifyTokens"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyTokensRequest:
        items, _ = as_list(inputs)
        # transformers' AggregationStrategy enum or its value
        strategy = getattr(params.get("aggregation_strategy"), "value", params.get("aggregation_strategy"))
        if isinstance(strategy, str):
            strategy = strategy.lower()
        if strategy not in _STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {[k for k in _STRATEGIES if k]}, got {strategy!r}")
        request = pb.ClassifyTokensRequest(model=self.model, inputs=items, aggregation_strategy=_STRATEGIES[strategy])
        if params.get("ignore_labels") is not None:
            request.ignore_labels.labels.extend(params["ignore_labels"])
            request.ignore_labels.SetInParent()  # set even when empty: "ignore nothing"
        return request

    def shape(self, response: pb.ClassifyTokensResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = [[_entity(e) for e in r.entities] for r in response.results]
        _, single = as_list(inputs)
        return outputs[0] if single else outputs


def _entity(e: pb.TokenEntity) -> dict[str, Any]:
    if e.entity_group:
        out: dict[str, Any] = {"entity_group": e.entity_group, "score": e.score}
    else:
        out = {"entity": e.entity, "score": e.score, "index": e.index}
    out["word"] = e.word
    out["start"] = e.start if e.HasField("start") else None
    out["end"] = e.end if e.HasField("end") else None
    return out
