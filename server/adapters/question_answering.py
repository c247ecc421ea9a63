"""pipeserve.v1.QuestionAnsweringService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc

TASK = "question-answering"

_OPTIONAL = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len", "align_to_words")


class QuestionAnsweringServicer(TaskServicer, pb_grpc.QuestionAnsweringServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Answer(self, request: pb.AnswerRequest, context) -> pb.AnswerResponse:
        inputs = [(item.question, item.context) for item in request.inputs]
        params: dict = {"handle_impossible_answer": request.handle_impossible_answer}
        params.update({name: getattr(request, name) for name in _OPTIONAL if request.HasField(name)})
        results, answered = await self.infer(request, inputs, params, context)
        return pb.AnswerResponse(results=[pb.Answers(answers=[pb.Answer(**a) for a in r]) for r in results], **answered)
