"""pipeserve.v1.ImageClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.adapters.text_classification import classifications, function_to_apply
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import image_classification_pb2 as pb
from pipeserve.v1 import image_classification_pb2_grpc as pb_grpc

TASK = "image-classification"


class ImageClassificationServicer(pb_grpc.ImageClassificationServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context) -> pb.ClassifyImageResponse:
        params: dict = {"function_to_apply": function_to_apply(request.function_to_apply)}
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.ClassifyImageResponse(
            results=classifications(results),
            model=served.name,
            model_version=served.version,
        )
