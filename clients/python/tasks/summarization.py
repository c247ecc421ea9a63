from __future__ import annotations

from typing import Any

from pipeserve.client.tasks import seq2seq
from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import summarization_pb2 as pb
from pipeserve.v1 import summarization_pb2_grpc as pb_grpc


class SummarizationCodec(TaskCodec):
    task = "summarization"
    stub = pb_grpc.SummarizationServiceStub
    method = "Summarize"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.SummarizeRequest:
        items, _ = as_list(inputs)
        return pb.SummarizeRequest(
            model=self.model, inputs=items, parameters=seq2seq.parameters(self.task, params),
            clean_up_tokenization_spaces=bool(params.get("clean_up_tokenization_spaces")),
        )

    def shape(self, response: pb.SummarizeResponse, inputs: Any, params: dict[str, Any]) -> Any:
        per_input = [[seq2seq.output(s, "summary") for s in r.summaries] for r in response.results]
        return seq2seq.shape(per_input, inputs)
