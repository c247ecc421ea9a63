from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import fill_mask_pb2 as pb
from pipeserve.v1 import fill_mask_pb2_grpc as pb_grpc


class FillMaskCodec(TaskCodec):
    task = "fill-mask"
    stub = pb_grpc.FillMaskServiceStub
    method = "FillMask"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.FillMaskRequest:
        items, _ = as_list(inputs)
        targets = params.get("targets")
        if isinstance(targets, str):
            targets = [targets]
        request = pb.FillMaskRequest(model=self.model, inputs=items, targets=targets or [])
        if params.get("top_k") is not None:
            request.top_k = params["top_k"]
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
