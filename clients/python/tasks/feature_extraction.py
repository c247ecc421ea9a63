"""feature-extraction: transformers 5's call shapes and results, and pipeserve's pooled vectors.

    embed("text")                       -> [[token vector, ...]]  ([1, tokens, hidden], as transformers)
    embed(["a", "b"])                   -> one such per input
    embed("text", return_tensors=True)  -> a torch tensor of that shape (torch needed on the client)
    embed("text", pooling="mean")       -> one vector (pipeserve: mean, cls or max; normalize=True)
"""

from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable, tokenizer_options
from pipeserve.v1 import feature_extraction_pb2 as pb
from pipeserve.v1 import feature_extraction_pb2_grpc as pb_grpc

_POOLINGS = {None: 0, "none": 0, "mean": 1, "cls": 2, "max": 3}

PARAMETERS = ParameterTable(
    served={
        "truncation": "True, False or a strategy, as the tokenizer takes it",
        "tokenize_kwargs": "the tokenizer's truncation, max_length and add_special_tokens",
        "return_tensors": "return torch tensors instead of nested lists (made here, from the response)",
        "pooling": "pipeserve's: one vector per input, the mean, cls or max of the token vectors",
        "normalize": "pipeserve's: L2-normalise each vector",
    },
).merged(CALL_OPTIONS)


def _nest(values: list[float], shape: list[int]) -> Any:
    if len(shape) <= 1:
        return list(values)
    step = len(values) // shape[0] if shape[0] else 0
    return [_nest(values[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class FeatureExtractionCodec(TaskCodec):
    task = "feature-extraction"
    stub = pb_grpc.FeatureExtractionServiceStub
    method = "Embed"
    parameters = PARAMETERS

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.EmbedRequest:
        served = PARAMETERS.check(self.task, params)
        items, _ = as_list(inputs)
        if not all(isinstance(item, str) for item in items):
            raise TypeError("feature-extraction takes a text or a list of texts")
        pooling = served.get("pooling")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {[k for k in _POOLINGS if k]}")
        request = pb.EmbedRequest(model=self.model, inputs=items, pooling=_POOLINGS[pooling],
                                  normalize=bool(served.get("normalize", False)))
        tokenizer_kwargs = dict(served.get("tokenize_kwargs") or {})
        if served.get("truncation") is not None:
            if "truncation" in tokenizer_kwargs:
                raise ValueError("truncation parameter defined twice (given as keyword argument as well as in "
                                 "tokenize_kwargs)")
            tokenizer_kwargs["truncation"] = served["truncation"]
        tokenizer_options(self.task, tokenizer_kwargs, request.tokenizer, "tokenize_kwargs")
        return request

    def shape(self, response: pb.EmbedResponse, inputs: Any, params: dict[str, Any]) -> Any:
        tensors = bool(params.get("return_tensors"))
        outputs = []
        for e in response.embeddings:
            if tensors:
                import torch

                value = torch.tensor(list(e.values), dtype=torch.float32).reshape(list(e.shape))
                outputs.append(value.unsqueeze(0) if len(e.shape) == 2 else value)
                continue
            nested = _nest(list(e.values), list(e.shape))
            # transformers returns token-level features with a batch axis of 1: [1, tokens, hidden].
            outputs.append([nested] if len(e.shape) == 2 else nested)
        _, single = as_list(inputs)
        return outputs[0] if single else outputs
