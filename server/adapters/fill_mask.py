"""pipeserve.v1.FillMaskService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer, tokenizer_parameters
from pipeserve.v1 import fill_mask_pb2 as pb
from pipeserve.v1 import fill_mask_pb2_grpc as pb_grpc

TASK = "fill-mask"


class FillMaskServicer(TaskServicer, pb_grpc.FillMaskServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def FillMask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        params: dict = tokenizer_parameters(request.tokenizer)
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        if request.targets:
            params["targets"] = list(request.targets)
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.FillMaskResponse(
            results=[
                pb.FilledInput(masks=[pb.MaskPredictions(predictions=[pb.MaskPrediction(**p) for p in mask])
                                      for mask in per_input])
                for per_input in results
            ],
            **answered,
        )
