"""pipeserve.v1.TranslationService over the data plane."""

from __future__ import annotations

from pipeserve.server.adapters.seq2seq import parameters
from pipeserve.server.adapters.status import timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.v1 import translation_pb2 as pb
from pipeserve.v1 import translation_pb2_grpc as pb_grpc

TASK = "translation"


class TranslationServicer(pb_grpc.TranslationServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    @unary_rpc(TASK)
    async def Translate(self, request: pb.TranslateRequest, context) -> pb.TranslateResponse:
        params = parameters(request.parameters)
        params["clean_up_tokenization_spaces"] = request.clean_up_tokenization_spaces
        if request.src_lang:
            params["src_lang"] = request.src_lang
        if request.tgt_lang:
            params["tgt_lang"] = request.tgt_lang
        served, results = await self.plane.infer(
            TASK, list(request.inputs), params, model=request.model, version=request.model_version,
            timeout=timeout_of(context),
        )
        return pb.TranslateResponse(
            results=[pb.Translations(translations=[pb.Translation(translation_text=t["translation_text"])
                                                   for t in per_input])
                     for per_input in results],
            model=served.name,
            model_version=served.version,
        )
