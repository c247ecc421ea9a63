"""pipeserve.v1.TokenClassificationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer, enum_option
from pipeserve.server.errors import InvalidArgument
from pipeserve.v1 import token_classification_pb2 as pb
from pipeserve.v1 import token_classification_pb2_grpc as pb_grpc

TASK = "token-classification"

_STRATEGIES = {
    pb.AGGREGATION_STRATEGY_UNSPECIFIED: None,
    pb.AGGREGATION_STRATEGY_NONE: "none",
    pb.AGGREGATION_STRATEGY_SIMPLE: "simple",
    pb.AGGREGATION_STRATEGY_FIRST: "first",
    pb.AGGREGATION_STRATEGY_AVERAGE: "average",
    pb.AGGREGATION_STRATEGY_MAX: "max",
}


def _entity(d: dict) -> pb.TokenEntity:
    entity = pb.TokenEntity(entity=d.get("entity", ""), entity_group=d.get("entity_group", ""), score=d["score"],
                            word=d["word"])
    if "index" in d:
        entity.index = d["index"]
    if d.get("start") is not None:
        entity.start = d["start"]
        entity.end = d["end"]
    return entity


class TokenClassificationServicer(TaskServicer, pb_grpc.TokenClassificationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def ClassifyTokens(self, request: pb.ClassifyTokensRequest, context) -> pb.ClassifyTokensResponse:
        params: dict = {"aggregation_strategy": enum_option("aggregation_strategy", _STRATEGIES,
                                                            request.aggregation_strategy)}
        if request.HasField("ignore_labels"):
            params["ignore_labels"] = list(request.ignore_labels.labels)
        if request.HasField("stride"):
            params["stride"] = request.stride
        inputs: list = list(request.inputs)
        if request.words:
            if inputs:
                raise InvalidArgument("words", "holds the inputs split into words; send either inputs or words, not both")
            inputs = [list(w.words) for w in request.words]
            params["is_split_into_words"] = True
            if request.HasField("delimiter"):
                params["delimiter"] = request.delimiter
        if request.offset_mapping:
            if len(request.offset_mapping) != len(inputs):
                raise InvalidArgument("offset_mapping", f"has {len(request.offset_mapping)} entries; it needs one per "
                                      f"input ({len(inputs)})")
            inputs = [{"input": item, "offset_mapping": [(s.start, s.end) for s in offsets.spans]}
                      for item, offsets in zip(inputs, request.offset_mapping)]
        results, answered = await self.infer(request, inputs, params, context)
        return pb.ClassifyTokensResponse(results=[pb.TokenEntities(entities=[_entity(d) for d in r]) for r in results],
                                         **answered)
