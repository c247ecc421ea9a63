"""pipeserve.v1.QuestionAnsweringService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc

TASK = "question-answering"

_OPTIONAL = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len", "align_to_words")


class QuestionAnsweringServicer(pb_grpc.QuestionAnsweringServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def Answer(self, request: pb.AnswerRequest, context) -> pb.AnswerResponse:
        inputs = [(item.question, item.context) for item in request.inputs]
        params: dict = {"handle_impossible_answer": request.handle_impossible_answer}
        params.update({name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)})
        served, results = await self.plane.infer(
            TASK, inputs, params, model=request.model, version=request.model_version, timeout=timeout_of(context)
        )
        return pb.AnswerResponse(
            results=[pb.Answers(answers=[pb.Answer(**a) for a in r]) for r in results],
            model=served.name,
            model_version=served.version,
        )
