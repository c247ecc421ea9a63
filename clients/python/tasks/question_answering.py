from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc

_INT_PARAMS = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len")


class QuestionAnsweringCodec(TaskCodec):
    """transformers 4.x's question-answering call shapes and outputs.

    qa(question="...", context="...")              -> {score, start, end, answer}
    qa({"question": ..., "context": ...})          -> the same
    qa(question=[q1, q2], context=c)                -> one result per question
    qa([{"question": ..., "context": ...}, ...])   -> one result per pair
    A result is one answer dict, or a list when top_k gives several (or none are found).
    """

    task = "question-answering"
    stub = pb_grpc.QuestionAnsweringServiceStub
    method = "Answer"

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        params = dict(params)
        if len(args) == 2 and all(isinstance(a, str) for a in args):
            return [{"question": args[0], "context": args[1]}], params
        if len(args) == 1:
            inputs = args[0]
        elif not args and "question" in params and "context" in params:
            question, context = params.pop("question"), params.pop("context")
            if isinstance(question, str) and isinstance(context, str):
                inputs = {"question": question, "context": context}
            elif isinstance(question, list) and isinstance(context, str):
                inputs = [{"question": q, "context": context} for q in question]
            elif isinstance(question, list) and isinstance(context, list):
                if len(question) != len(context):
                    raise ValueError("questions and contexts don't have the same lengths")
                inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
            else:
                raise ValueError("question and context must be strings or lists of strings")
        else:
            raise TypeError("pass question= and context=, a {'question', 'context'} dict, or a list of them")
        if "topk" in params and "top_k" not in params:  # 4.x's deprecated spelling
            params["top_k"] = params.pop("topk")
        return inputs, params

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.AnswerRequest:
        items = [inputs] if isinstance(inputs, dict) else list(inputs)
        pairs = []
        for item in items:
            if not isinstance(item, dict) or "question" not in item or "context" not in item:
                raise ValueError("each input needs the keys 'question' and 'context'")
            pairs.append(pb.QuestionContext(question=item["question"], context=item["context"]))
        request = pb.AnswerRequest(model=self.model, inputs=pairs,
                                   handle_impossible_answer=bool(params.get("handle_impossible_answer", False)))
        for name in _INT_PARAMS:
            if params.get(name) is not None:
                setattr(request, name, params[name])
        if params.get("align_to_words") is not None:
            request.align_to_words = bool(params["align_to_words"])
        return request

    def shape(self, response: pb.AnswerResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = []
        for result in response.results:
            answers = [{"score": a.score, "start": a.start, "end": a.end, "answer": a.answer} for a in result.answers]
            outputs.append(answers[0] if len(answers) == 1 else answers)
        # As in 4.x, a single pair (or a list of one) gives its result unwrapped.
        return outputs[0] if len(outputs) == 1 else outputs
