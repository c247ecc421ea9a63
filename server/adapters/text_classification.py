"""pipeserve.v1.TextClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer, enum_option, tokenizer_parameters
from pipeserve.server.errors import InvalidArgument
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc

TASK = "text-classification"

_FUNCTIONS = {
    pb.FUNCTION_TO_APPLY_UNSPECIFIED: None,
    pb.FUNCTION_TO_APPLY_SOFTMAX: "softmax",
    pb.FUNCTION_TO_APPLY_SIGMOID: "sigmoid",
    pb.FUNCTION_TO_APPLY_NONE: "none",
}


def function_to_apply(value: int) -> str | None:
    """The wire enum as the task's parameter (None: the model's default). Image classification
    shares the enum."""
    return enum_option("function_to_apply", _FUNCTIONS, value)


def classifications(results: list) -> list[pb.Classification]:
    """The task's ranked labels, one list per input, as wire messages (image classification too)."""
    return [pb.Classification(labels=[pb.LabelScore(label=d["label"], score=d["score"]) for d in r]) for r in results]


class TextClassificationServicer(TaskServicer, pb_grpc.TextClassificationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Classify(self, request: pb.ClassifyRequest, context) -> pb.ClassifyResponse:
        inputs: list = list(request.inputs)
        if request.text_pairs:
            if len(request.text_pairs) != len(inputs):
                raise InvalidArgument("text_pairs", f"has {len(request.text_pairs)} entries; it needs one per input ({len(inputs)})")
            # An empty text_pair: that input has none (a batch may mix texts and pairs).
            inputs = [(text, pair) if pair else text for text, pair in zip(inputs, request.text_pairs)]
        params = {"function_to_apply": function_to_apply(request.function_to_apply),
                  "return_all_scores": request.return_all_scores, **tokenizer_parameters(request.tokenizer)}
        if request.HasField("top_k"):
            params["top_k"] = request.top_k
        results, answered = await self.infer(request, inputs, params, context)
        return pb.ClassifyResponse(results=classifications(results), **answered)
