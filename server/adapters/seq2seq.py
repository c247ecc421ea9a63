"""pipeserve.v1.Seq2SeqGenerationParameters (summarization, translation) as transformers' generate() names."""

from __future__ import annotations

from typing import Any

from pipeserve.v1 import seq2seq_generation_pb2 as pb

_FIELDS = tuple(field.name for field in pb.Seq2SeqGenerationParameters.DESCRIPTOR.fields)


def parameters(message: pb.Seq2SeqGenerationParameters) -> dict[str, Any]:
    """The parameters a request sets (every field is optional: unset ones are left out)."""
    return {name: getattr(message, name) for name in _FIELDS if message.HasField(name)}
