"""text-classification (alias sentiment-analysis): transformers 5's call shapes and results.

    clf("text")                                 -> [{label, score}]            (the best label)
    clf(["a", "b"])                             -> [{label, score}, ...]        (one per input)
    clf({"text": t, "text_pair": p})            -> {label, score}               (a sentence pair)
    clf(x, top_k=2) / top_k=None                -> labels ranked, per input
    clf(x, return_all_scores=True)              -> every label, in label order (transformers 4.x)
"""

from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.parameters import CALL_OPTIONS, TOKENIZER_ARGUMENTS, ParameterTable, int_value, tokenizer_options
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc

_FUNCTIONS = {None: 0, "default": 0, "softmax": 1, "sigmoid": 2, "none": 3}
# Marks a call whose top_k came from pipeline(..., top_k=...) alone: transformers then wraps a single
# text's labels in one more list (its __call__ looks at the call's own keyword arguments).
_TOP_K_FROM_PIPELINE = "_pipeserve_top_k_from_pipeline"

PARAMETERS = ParameterTable(
    served={
        "top_k": "labels per input, ranked; None: every label. Unset: the best label alone",
        "function_to_apply": "softmax, sigmoid or none (transformers' ClassificationFunction too); unset: the model's",
        "return_all_scores": "transformers 4.x's: with top_k unset, every label in the model's order "
                             "(transformers 5 hands it to the tokenizer, which ignores it)",
        "text_pair": "a second text for every input (a keyword argument transformers hands to the tokenizer)",
    },
).merged(TOKENIZER_ARGUMENTS).merged(CALL_OPTIONS)


class TextClassificationCodec(TaskCodec):
    task = "text-classification"
    aliases = ("sentiment-analysis",)
    stub = pb_grpc.TextClassificationServiceStub
    method = "Classify"
    parameters = PARAMETERS

    def with_defaults(self, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        merged = super().with_defaults(defaults, params)
        if "top_k" in defaults and "top_k" not in params:
            merged[_TOP_K_FROM_PIPELINE] = True
        return merged

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyRequest:
        params = {k: v for k, v in params.items() if k != _TOP_K_FROM_PIPELINE}
        served = PARAMETERS.check(self.task, params)
        texts, pairs = [], []
        for item in _items(inputs):
            text, pair = _text_and_pair(item, served.get("text_pair"))
            texts.append(text)
            pairs.append(pair or "")
        function = served.get("function_to_apply")
        function = getattr(function, "value", function)  # transformers' ClassificationFunction enum
        if isinstance(function, str):
            function = function.lower()
        if function not in _FUNCTIONS:
            raise KeyError(f"function_to_apply must be one of softmax, sigmoid, none, got {function!r}")
        request = pb.ClassifyRequest(
            model=self.model, inputs=texts, text_pairs=pairs if any(pairs) else [],
            function_to_apply=_FUNCTIONS[function], return_all_scores=bool(served.get("return_all_scores")),
        )
        if "top_k" in served:
            top_k = served["top_k"]
            if top_k is None:
                request.top_k = 0  # the wire's 0: every label
            else:
                # transformers' top_k=0 gives no labels: asked for 1 here and cut in shape().
                request.top_k = int_value(self.task, "top_k", top_k) or 1
        tokenizer_options(self.task, {k: v for k, v in served.items() if k in TOKENIZER_ARGUMENTS.served},
                          request.tokenizer)
        return request

    def shape(self, response: pb.ClassifyResponse, inputs: Any, params: dict[str, Any]) -> Any:
        results = [[{"label": s.label, "score": s.score} for s in r.labels] for r in response.results]
        ranked = "top_k" in params
        if ranked and params["top_k"] == 0:
            results = [[] for _ in results]
        elif not ranked and not params.get("return_all_scores"):
            results = [r[0] for r in results]  # transformers' legacy result: the best label's dict
        if isinstance(inputs, str):
            # transformers wraps a single text's result in a list unless the call itself set top_k.
            return results if not ranked or params.get(_TOP_K_FROM_PIPELINE) else results[0]
        return results[0] if isinstance(inputs, dict) else results


def _items(inputs: Any) -> list[Any]:
    if isinstance(inputs, (str, dict)):
        return [inputs]
    if isinstance(inputs, (list, tuple)):
        return list(inputs)
    raise TypeError(f"text-classification takes a text, a {{'text', 'text_pair'}} dict or a list of them, "
                    f"not {type(inputs).__name__}")


def _text_and_pair(item: Any, text_pair: Any) -> tuple[str, str | None]:
    """One input as (text, its pair or None), with transformers' rules for each form."""
    if isinstance(item, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TypeError(f"text_pair must be a string, got {type(text_pair).__name__}")
        return item, text_pair
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"text", "text_pair"})
        if unknown or "text" not in item:
            raise TypeError(f"a text-classification input dict takes the keys text and text_pair, got {sorted(item)}")
        if text_pair is not None and "text_pair" in item:
            raise TypeError("text_pair is given twice: in the input dict and as a keyword argument")
        text, pair = item["text"], item.get("text_pair", text_pair)
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            raise TypeError("text and text_pair must be strings")
        return text, pair
    # transformers' old form of a pair: [[text, text_pair]] as one input.
    if isinstance(item, list) and len(item) == 1 and isinstance(item[0], list) and len(item[0]) == 2:
        return _text_and_pair({"text": item[0][0], "text_pair": item[0][1]}, text_pair)
    if isinstance(item, list):
        raise ValueError('The pipeline received invalid inputs, if you are trying to send text pairs, you can try to '
                         'send a dictionary `{"text": "My text", "text_pair": "My pair"}` in order to send a text pair.')
    raise TypeError(f"a text-classification input is a text or a {{'text', 'text_pair'}} dict, not {type(item).__name__}")
