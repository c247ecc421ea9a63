"""pipeserve.v1.ImageClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument
from pipeserve.v1 import image_classification_pb2 as pb
from pipeserve.v1 import image_classification_pb2_grpc as pb_grpc
from pipeserve.v1 import text_classification_pb2 as classification_pb

TASK = "image-classification"

_FUNCTIONS = {
    classification_pb.FUNCTION_TO_APPLY_UNSPECIFIED: None,
    classification_pb.FUNCTION_TO_APPLY_SOFTMAX: "softmax",
    classification_pb.FUNCTION_TO_APPLY_SIGMOID: "sigmoid",
    classification_pb.FUNCTION_TO_APPLY_NONE: "none",
}


class ImageClassificationServicer(pb_grpc.ImageClassificationServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def ClassifyImage(self, request: pb.ClassifyImageRequest, context) -> pb.ClassifyImageResponse:
        if request.function_to_apply not in _FUNCTIONS:
            raise InvalidArgument("function_to_apply", f"unknown value {request.function_to_apply}")
        params: dict = {"function_to_apply": _FUNCTIONS[request.function_to_apply]}
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.ClassifyImageResponse(
            results=[
                classification_pb.Classification(labels=[classification_pb.LabelScore(**d) for d in r])
                for r in results
            ],
            model=served.name,
            model_version=served.version,
        )
