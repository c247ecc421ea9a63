"""pipeserve.v1.FeatureExtractionService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument
from pipeserve.v1 import feature_extraction_pb2 as pb
from pipeserve.v1 import feature_extraction_pb2_grpc as pb_grpc

TASK = "feature-extraction"

_POOLINGS = {pb.POOLING_UNSPECIFIED: "none", pb.POOLING_MEAN: "mean", pb.POOLING_CLS: "cls", pb.POOLING_MAX: "max"}


class FeatureExtractionServicer(pb_grpc.FeatureExtractionServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        if request.pooling not in _POOLINGS:
            raise InvalidArgument("pooling", f"unknown value {request.pooling}")
        params = {"pooling": _POOLINGS[request.pooling], "normalize": request.normalize}
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version, timeout=timeout_of(context)
        )
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=t.reshape(-1).tolist(), shape=list(t.shape)) for t in results],
            model=served.name,
            model_version=served.version,
        )
