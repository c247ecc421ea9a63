"""pipeserve.v1.TranslationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.seq2seq import parameters, token_ids_or_text
from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.v1 import translation_pb2 as pb
from pipeserve.v1 import translation_pb2_grpc as pb_grpc

TASK = "translation"


class TranslationServicer(TaskServicer, pb_grpc.TranslationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        params = parameters(request)
        if request.src_lang:
            params["src_lang"] = request.src_lang
        if request.tgt_lang:
            params["tgt_lang"] = request.tgt_lang
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.TranslateResponse(
            results=[pb.Translations(translations=[pb.Translation(**token_ids_or_text(t, "translation"))
                                                   for t in per_input])
                     for per_input in results],
            **answered,
        )
