from __future__ import annotations

import re
from typing import Any

from pipeserve.client.tasks import seq2seq
from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import translation_pb2 as pb
from pipeserve.v1 import translation_pb2_grpc as pb_grpc

_PAIR = re.compile(r"^translation_([A-Za-z_\-]+)_to_([A-Za-z_\-]+)$")


class TranslationCodec(TaskCodec):
    """pipeline("translation_en_to_fr") sends src_lang "en" and tgt_lang "fr", as transformers does."""

    task = "translation"
    stub = pb_grpc.TranslationServiceStub
    method = "Translate"

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.TranslateRequest:
        items, _ = as_list(inputs)
        src, tgt = params.get("src_lang"), params.get("tgt_lang")
        match = _PAIR.match(self.task_name)
        if match and src is None and tgt is None:
            src, tgt = match.group(1), match.group(2)
        return pb.TranslateRequest(
            model=self.model, inputs=items, src_lang=src or "", tgt_lang=tgt or "",
            parameters=seq2seq.parameters(self.task_name, params),
            clean_up_tokenization_spaces=bool(params.get("clean_up_tokenization_spaces")),
        )

    def shape(self, response: pb.TranslateResponse, inputs: Any, params: dict[str, Any]) -> Any:
        per_input = [[seq2seq.output(t, "translation") for t in r.translations] for r in response.results]
        return seq2seq.shape(per_input, inputs)
