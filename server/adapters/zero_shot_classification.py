"""pipeserve.v1.ZeroShotClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import zero_shot_classification_pb2 as pb
from pipeserve.v1 import zero_shot_classification_pb2_grpc as pb_grpc

TASK = "zero-shot-classification"


class ZeroShotClassificationServicer(pb_grpc.ZeroShotClassificationServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def ClassifyZeroShot(self, request: pb.ClassifyZeroShotRequest, context) -> pb.ClassifyZeroShotResponse:
        params = {
            "candidate_labels": list(request.candidate_labels),
            "hypothesis_template": request.hypothesis_template or None,
            "multi_label": request.multi_label,
        }
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.ClassifyZeroShotResponse(
            results=[pb.ZeroShotClassification(**r) for r in results],
            model=served.name,
            model_version=served.version,
        )
