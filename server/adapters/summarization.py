"""pipeserve.v1.SummarizationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.seq2seq import parameters
from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import summarization_pb2 as pb
from pipeserve.v1 import summarization_pb2_grpc as pb_grpc

TASK = "summarization"


class SummarizationServicer(pb_grpc.SummarizationServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def Summarize(self, request: pb.SummarizeRequest, context) -> pb.SummarizeResponse:
        params = parameters(request.parameters)
        params["clean_up_tokenization_spaces"] = request.clean_up_tokenization_spaces
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.SummarizeResponse(
            results=[pb.Summaries(summaries=[pb.Summary(summary_text=s["summary_text"]) for s in per_input])
                     for per_input in results],
            model=served.name,
            model_version=served.version,
        )
