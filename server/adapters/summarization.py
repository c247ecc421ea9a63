"""pipeserve.v1.SummarizationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.seq2seq import parameters, token_ids_or_text
from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.v1 import summarization_pb2 as pb
from pipeserve.v1 import summarization_pb2_grpc as pb_grpc

TASK = "summarization"


class SummarizationServicer(TaskServicer, pb_grpc.SummarizationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Summarize(self, request: pb.SummarizeRequest, context) -> pb.SummarizeResponse:
        results, answered = await self.infer(request, list(request.inputs), parameters(request), context)
        return pb.SummarizeResponse(
            results=[pb.Summaries(summaries=[pb.Summary(**token_ids_or_text(s, "summary")) for s in per_input])
                     for per_input in results],
            **answered,
        )
