"""fill-mask: transformers 5's call shapes and results.

    fill("Paris is the [MASK] of France.")  -> predictions for the mask, best first
    fill("My [MASK] is [MASK].")            -> one list of predictions per mask
    fill([t1, t2])                          -> one result per input (a list of one: its result)
"""

from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable, int_value, tokenizer_options
from pipeserve.v1 import fill_mask_pb2 as pb
from pipeserve.v1 import fill_mask_pb2_grpc as pb_grpc

PARAMETERS = ParameterTable(
    served={
        "top_k": "predictions per mask (default 5; 0: none)",
        "targets": "limit the predictions to these words (a word outside the vocabulary: its first token)",
        "tokenizer_kwargs": "the tokenizer's truncation, max_length and add_special_tokens",
    },
).merged(CALL_OPTIONS)


class FillMaskCodec(TaskCodec):
    task = "fill-mask"
    stub = pb_grpc.FillMaskServiceStub
    method = "FillMask"
    parameters = PARAMETERS

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.FillMaskRequest:
        served = PARAMETERS.check(self.task, params)
        items, _ = as_list(inputs)
        if not all(isinstance(item, str) for item in items):
            raise TypeError("fill-mask takes a text or a list of texts")
        targets = served.get("targets")
        if isinstance(targets, str):
            targets = [targets]
        if targets is not None and not targets:
            raise ValueError("At least one target must be provided when passed.")
        request = pb.FillMaskRequest(model=self.model, inputs=items, targets=targets or [])
        if served.get("top_k") is not None:
            request.top_k = int_value(self.task, "top_k", served["top_k"])
        if served.get("tokenizer_kwargs") is not None:
            tokenizer_options(self.task, served["tokenizer_kwargs"], request.tokenizer, "tokenizer_kwargs")
        return request

    def shape(self, response: pb.FillMaskResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = []
        for result in response.results:
            masks = [[{"score": p.score, "token": p.token, "token_str": p.token_str, "sequence": p.sequence}
                      for p in mask.predictions] for mask in result.masks]
            # One mask: its predictions; several: one list per mask (transformers' shape).
            outputs.append(masks[0] if len(masks) == 1 else masks)
        # transformers unwraps a list of one input too.
        return outputs[0] if len(outputs) == 1 else outputs
