"""What summarization and translation requests share: pipeserve.v1.Seq2SeqGenerationParameters as
transformers' generate() names, and clean_up_tokenization_spaces."""

from __future__ import annotations

from typing import Any

from pipeserve.v1 import seq2seq_generation_pb2 as pb

_FIELDS = tuple(field.name for field in pb.Seq2SeqGenerationParameters.DESCRIPTOR.fields)


def parameters(request: Any) -> dict[str, Any]:
    """The parameters a SummarizeRequest or TranslateRequest sets (every generation field is
    optional: unset ones are left out)."""
    message = request.parameters
    params = {name: getattr(message, name) for name in _FIELDS if message.HasField(name)}
    params["clean_up_tokenization_spaces"] = request.clean_up_tokenization_spaces
    return params
