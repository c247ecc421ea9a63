"""token-classification (alias ner): transformers 5's call shapes and results.

    ner("text") / ner(["a", "b"])                         -> entities / one list per input
    ner(["Hello", "Paris"], is_split_into_words=True)     -> [entities]  (one pre-split input)
    ner([["Hello"], ["Paris"]], is_split_into_words=True) -> one list per input
    ner("text", offset_mapping=[(0, 0), (0, 5), ...])     -> its tokens' spans replaced
"""

from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.client.tasks.parameters import CALL_OPTIONS, ParameterTable, int_value
from pipeserve.v1 import token_classification_pb2 as pb
from pipeserve.v1 import token_classification_pb2_grpc as pb_grpc

_STRATEGIES = {None: 0, "none": 1, "simple": 2, "first": 3, "average": 4, "max": 5}

PARAMETERS = ParameterTable(
    served={
        "aggregation_strategy": "none, simple, first, average or max (transformers' AggregationStrategy too)",
        "ignore_labels": "labels (or entity groups) to leave out; unset: ['O']",
        "offset_mapping": "each token's (start, end) in the text, special tokens included: one list for a "
                          "single input, one per input for a batch (transformers gives every input of a batch "
                          "the first one's; pipeserve gives each its own)",
        "is_split_into_words": "the inputs are lists of words",
        "delimiter": "what joins pre-split words into the text that start/end index (default a space)",
        "stride": "label a text longer than the model in overlapping windows sharing this many tokens",
    },
).merged(CALL_OPTIONS)


class TokenClassificationCodec(TaskCodec):
    task = "token-classification"
    aliases = ("ner",)
    stub = pb_grpc.TokenClassificationServiceStub
    method = "ClassifyTokens"
    parameters = PARAMETERS

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.ClassifyTokensRequest:
        served = PARAMETERS.check(self.task, params)
        # transformers' AggregationStrategy enum or its value
        strategy = getattr(served.get("aggregation_strategy"), "value", served.get("aggregation_strategy"))
        if isinstance(strategy, str):
            strategy = strategy.lower()
        if strategy not in _STRATEGIES:
            raise KeyError(f"aggregation_strategy must be one of {[k for k in _STRATEGIES if k]}, got {strategy!r}")
        request = pb.ClassifyTokensRequest(model=self.model, aggregation_strategy=_STRATEGIES[strategy])
        items = self.items(inputs, served)
        if served.get("is_split_into_words"):
            for words in items:
                if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                    raise ValueError("When `is_split_into_words=True`, `sentence` must be a list of tokens.")
                request.words.add(words=list(words))
            if served.get("delimiter") is not None:
                request.delimiter = served["delimiter"]
        else:
            for text in items:
                if not isinstance(text, str):
                    raise ValueError("When `is_split_into_words=False`, `sentence` must be an untokenized string.")
            request.inputs.extend(items)
        if served.get("offset_mapping"):
            for spans in _offset_mappings(served["offset_mapping"], len(items)):
                message = request.offset_mapping.add()
                for start, end in spans:
                    message.spans.add(start=int_value(self.task, "offset_mapping", start),
                                      end=int_value(self.task, "offset_mapping", end))
        if served.get("ignore_labels") is not None:
            labels = served["ignore_labels"]
            request.ignore_labels.labels.extend([labels] if isinstance(labels, str) else labels)
            request.ignore_labels.SetInParent()  # set even when empty: "ignore nothing"
        if served.get("stride") is not None:
            request.stride = int_value(self.task, "stride", served["stride"])
        return request

    @staticmethod
    def items(inputs: Any, params: dict[str, Any]) -> list[Any]:
        """The inputs as a list; with is_split_into_words a list of words is one input unless it is
        a list of lists (transformers' rule)."""
        if params.get("is_split_into_words") and isinstance(inputs, (list, tuple)) and \
                not all(isinstance(item, list) for item in inputs):
            return [inputs]
        if isinstance(inputs, list) and not inputs:
            raise ValueError("At least one input is required.")
        return as_list(inputs)[0]

    def shape(self, response: pb.ClassifyTokensResponse, inputs: Any, params: dict[str, Any]) -> Any:
        outputs = [[_entity(e) for e in r.entities] for r in response.results]
        # A single text gives its entities; a list (a pre-split input among them) one list per input.
        return outputs[0] if isinstance(inputs, str) else outputs


def _offset_mappings(offset_mapping: Any, inputs: int) -> list[Any]:
    """One list of spans per input: a single input's list may come unbatched, as transformers takes it."""
    if not isinstance(offset_mapping, (list, tuple)):
        raise TypeError(f"offset_mapping must be a list of (start, end) pairs, got {type(offset_mapping).__name__}")
    first = offset_mapping[0]
    if isinstance(first, (list, tuple)) and len(first) == 2 and all(isinstance(x, int) for x in first):
        offset_mapping = [offset_mapping]
    if len(offset_mapping) != inputs:
        raise ValueError("offset_mapping should have the same batch size as the input")
    for spans in offset_mapping:
        if not isinstance(spans, (list, tuple)) or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in spans):
            raise TypeError("offset_mapping must hold (start, end) pairs")
    return list(offset_mapping)


def _entity(e: pb.TokenEntity) -> dict[str, Any]:
    if e.entity_group:
        out: dict[str, Any] = {"entity_group": e.entity_group, "score": e.score}
    else:
        out = {"entity": e.entity, "score": e.score, "index": e.index}
    out["word"] = e.word
    out["start"] = e.start if e.HasField("start") else None
    out["end"] = e.end if e.HasField("end") else None
    return out
