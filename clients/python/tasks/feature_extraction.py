from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import feature_extraction_pb2 as pb
from pipeserve.v1 import feature_extraction_pb2_grpc as pb_grpc

_POOLINGS = {None: 0, "none": 0, "mean": 1, "cls": 2, "max": 3}


def _nest(values: list[float], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(values)
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class FeatureExtractionCodec(TaskCodec):
    task = "feature-extraction"
    stub = pb_grpc.FeatureExtractionServiceStub
    method = "Embed"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.EmbedRequest:
        items, _ = as_list(inputs)
        pooling = params.get("pooling")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {[k for k in _POOLINGS if k]}")
        return pb.EmbedRequest(model=self.model, inputs=items, pooling=_POOLINGS[pooling],
                               normalize=bool(params.get("normalize", False)))

    def shape(self, response: pb.EmbedResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = []
        for e in response.embeddings:
            nested = _nest(list(e.values), list(e.shape))
            # transformers returns token-level features with a batch axis of 1: [1, tokens, hidden].
            outputs.append([nested] if len(e.shape) == 2 else nested)
        _, single = as_list(inputs)
        return outputs[0] if single else outputs
