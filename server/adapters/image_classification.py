"""pipeserve.v1.ImageClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.server.adapters.text_classification import classifications, function_to_apply
from pipeserve.v1 import image_classification_pb2 as pb
from pipeserve.v1 import image_classification_pb2_grpc as pb_grpc

TASK = "image-classification"


class ImageClassificationServicer(TaskServicer, pb_grpc.ImageClassificationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context) -> pb.ClassifyImageResponse:
        params: dict = {"function_to_apply": function_to_apply(request.function_to_apply)}
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.ClassifyImageResponse(results=classifications(results), **answered)
