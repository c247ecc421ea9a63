from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc

_FUNCTIONS = {None: 0, "default": 0, "softmax": 1, "sigmoid": 2, "none": 3}


class TextClassificationCodec(TaskCodec):
    task = "text-classification"
    aliases = ("sentiment-analysis",)
    stub = pb_grpc.TextClassificationServiceStub
    method = "Classify"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyRequest:
        items, _ = as_list(inputs)
        texts, pairs = [], []
        for item in items:
            if isinstance(item, dict):
                texts.append(item["text"])
                pairs.append(item.get("text_pair", ""))
            else:
                texts.append(item)
        function = params.get("function_to_apply")
        if hasattr(function, "value"):  # transformers' ClassificationFunction enum
            function = function.value
        request = pb.ClassifyRequest(
            model=self.model, inputs=texts, text_pairs=pairs if any(pairs) else [],
            function_to_apply=_FUNCTIONS[function],
        )
        if "top_k" in params:
            request.top_k = params["top_k"] or 0  # None (every label) travels as 0
        return request

    def shape(self, response: pb.ClassifyResponse, inputs: Any, params: dict[str, Any]) -> Any:
        results = [[{"label": s.label, "score": s.score} for s in r.labels] for r in response.results]
        _, single = as_list(inputs)
        if "top_k" not in params:
            # transformers' legacy shape: the best label as a dict per input, in a list.
            return [r[0] for r in results]
        return results[0] if single else results
