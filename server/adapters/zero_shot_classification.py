"""pipeserve.v1.ZeroShotClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.v1 import zero_shot_classification_pb2 as pb
from pipeserve.v1 import zero_shot_classification_pb2_grpc as pb_grpc

TASK = "zero-shot-classification"


class ZeroShotClassificationServicer(TaskServicer, pb_grpc.ZeroShotClassificationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def ClassifyZeroShot(self, request: pb.ClassifyZeroShotRequest, context) -> pb.ClassifyZeroShotResponse:
        params = {
            "candidate_labels": list(request.candidate_labels),
            "hypothesis_template": request.hypothesis_template or None,
            "multi_label": request.multi_label,
        }
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.ClassifyZeroShotResponse(results=[pb.ZeroShotClassification(**r) for r in results], **answered)
