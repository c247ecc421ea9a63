"""pipeserve.v1.FeatureExtractionService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer, enum_option, tokenizer_parameters
from pipeserve.v1 import feature_extraction_pb2 as pb
from pipeserve.v1 import feature_extraction_pb2_grpc as pb_grpc

TASK = "feature-extraction"

_POOLINGS = {pb.POOLING_UNSPECIFIED: "none", pb.POOLING_MEAN: "mean", pb.POOLING_CLS: "cls", pb.POOLING_MAX: "max"}


class FeatureExtractionServicer(TaskServicer, pb_grpc.FeatureExtractionServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        params = {"pooling": enum_option("pooling", _POOLINGS, request.pooling), "normalize": request.normalize,
                  **tokenizer_parameters(request.tokenizer)}
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=r.vector.reshape(-1).tolist(), shape=list(r.vector.shape)) for r in results],
            **answered)
