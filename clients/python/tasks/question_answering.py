"""question-answering: transformers 4.x's call shapes and outputs (transformers 5 dropped the task).

    qa(question="...", context="...")              -> {score, start, end, answer}
    qa({"question": ..., "context": ...})          -> the same
    qa(question=[q1, q2], context=c)                -> one result per question
    qa([{"question": ..., "context": ...}, ...])   -> one result per pair
    qa(example1, example2)                          -> one result per example (SquadExample-like:
                                                       .question_text and .context_text)
A result is one answer dict, or a list when top_k gives several (or none are found).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable, int_value
from pipeserve.v1 import question_answering_pb2 as pb
from pipeserve.v1 import question_answering_pb2_grpc as pb_grpc

_INT_PARAMS = ("top_k", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len")
_PADDINGS = (True, False, "longest", "max_length", "do_not_pad")

PARAMETERS = ParameterTable(
    served={
        "top_k": "answers per input (default 1)",
        "topk": "transformers 4.x's deprecated spelling of top_k",
        "doc_stride": "tokens shared by consecutive windows of a long context",
        "max_answer_len": "longest answer in tokens (default 15)",
        "max_seq_len": "tokens per window of question and context (default min(model maximum, 384))",
        "max_question_len": "the question is cut to this many tokens (default 64)",
        "handle_impossible_answer": "let the empty answer compete",
        "align_to_words": "widen answers to whole words (default True)",
    },
    ignored={"padding": "padding tokens are masked out of every span's score: it never changes an answer"},
).merged(CALL_OPTIONS)


class QuestionAnsweringCodec(TaskCodec):
    task = "question-answering"
    stub = pb_grpc.QuestionAnsweringServiceStub
    method = "Answer"
    parameters = PARAMETERS

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """transformers 4.x's QuestionAnsweringArgumentHandler: the inputs from the arguments."""
        params = dict(params)
        if args:
            if len(args) == 1:
                inputs = args[0]
            elif len(args) == 2 and all(isinstance(a, str) for a in args):
                inputs = [{"question": args[0], "context": args[1]}]
            else:
                inputs = list(args)
        elif "X" in params or "data" in params:  # 4.x's deprecated sklearn-style keywords
            inputs = params.pop("X") if "X" in params else params.pop("data")
        elif "question" in params and "context" in params:
            question, context = params.pop("question"), params.pop("context")
            if isinstance(question, list) and isinstance(context, str):
                inputs = [{"question": q, "context": context} for q in question]
            elif isinstance(question, list) and isinstance(context, list):
                if len(question) != len(context):
                    raise ValueError("Questions and contexts don't have the same lengths")
                inputs = [{"question": q, "context": c} for q, c in zip(question, context)]
            elif isinstance(question, str) and isinstance(context, str):
                inputs = [{"question": question, "context": context}]
            else:
                raise ValueError("Arguments can't be understood")
        else:
            raise ValueError(f"Unknown arguments {params}")
        if "topk" in params and params.get("top_k") is None:
            params["top_k"] = params.pop("topk")
        params.pop("topk", None)
        return inputs, params

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.AnswerRequest:
        served = PARAMETERS.check(self.task, params)
        if params.get("padding", False) not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {params['padding']!r}")
        request = pb.AnswerRequest(model=self.model, inputs=[pb.QuestionContext(question=q, context=c)
                                                             for q, c in _examples(inputs)],
                                   handle_impossible_answer=bool(served.get("handle_impossible_answer", False)))
        for name in _INT_PARAMS:
            if served.get(name) is not None:
                setattr(request, name, int_value(self.task, name, served[name]))
        if served.get("align_to_words") is not None:
            request.align_to_words = bool(served["align_to_words"])
        return request

    def shape(self, response: pb.AnswerResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = []
        for result in response.results:
            answers = [{"score": a.score, "start": a.start, "end": a.end, "answer": a.answer} for a in result.answers]
            outputs.append(answers[0] if len(answers) == 1 else answers)
        # As in 4.x, a single pair (or a list of one) gives its result unwrapped.
        return outputs[0] if len(outputs) == 1 else outputs


def _examples(inputs: Any) -> list[tuple[str, str]]:
    """(question, context) per input, checked as transformers 4.x's argument handler checks them."""
    if isinstance(inputs, dict) or _is_example(inputs):
        items = [inputs]
    elif isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes)):
        items = list(inputs)
    else:
        raise ValueError(f"Invalid arguments {inputs!r}")
    pairs = []
    for item in items:
        if _is_example(item):
            pairs.append((item.question_text, item.context_text))
            continue
        if not isinstance(item, dict):
            raise ValueError(f"{item} argument needs to be of type (SquadExample, dict)")
        for key in ("question", "context"):
            if key not in item:
                raise KeyError("You need to provide a dictionary with keys {question:..., context:...}")
            if item[key] is None:
                raise ValueError(f"`{key}` cannot be None")
            if isinstance(item[key], str) and not item[key]:
                raise ValueError(f"`{key}` cannot be empty")
            if not isinstance(item[key], str):
                raise TypeError(f"`{key}` must be a string, got {type(item[key]).__name__}")
        pairs.append((item["question"], item["context"]))
    return pairs


def _is_example(item: Any) -> bool:
    """transformers' SquadExample (or anything shaped like it)."""
    return isinstance(getattr(item, "question_text", None), str) and isinstance(getattr(item, "context_text", None), str)
