"""pipeserve.v1.FillMaskService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import fill_mask_pb2 as pb
from pipeserve.v1 import fill_mask_pb2_grpc as pb_grpc

TASK = "fill-mask"


class FillMaskServicer(pb_grpc.FillMaskServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def FillMask(self, request: pb.FillMaskRequest, context) -> pb.FillMaskResponse:
        params: dict = {}
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        if request.targets:
            params["targets"] = list(request.targets)
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.FillMaskResponse(
            results=[
                pb.FilledInput(masks=[pb.MaskPredictions(predictions=[pb.MaskPrediction(**p) for p in mask])
                                      for mask in per_input])
                for per_input in results
            ],
            model=served.name,
            model_version=served.version,
        )
