"""The encoder-decoder generation tasks' shared request parameters (summarization, translation)."""

from __future__ import annotations

from typing import Any

from pipeserve.v1 import seq2seq_generation_pb2 as pb

FIELDS = frozenset(f.name for f in pb.Seq2SeqGenerationParameters.DESCRIPTOR.fields)


def parameters(task: str, params: dict[str, Any],
               extra: frozenset[str] = frozenset()) -> pb.Seq2SeqGenerationParameters:
    """generate() keyword arguments as a Seq2SeqGenerationParameters message."""
    unknown = sorted(set(params) - FIELDS - extra - {"clean_up_tokenization_spaces"})
    if unknown:
        raise TypeError(f"{task} got unknown parameters {unknown}; known: {sorted(FIELDS | extra)}")
    message = pb.Seq2SeqGenerationParameters()
    for name in FIELDS:
        if params.get(name) is not None:
            setattr(message, name, params[name])
    return message


def shape(per_input: list[list[dict[str, Any]]], inputs: Any) -> Any:
    """transformers 4.x's shapes: a list with one dict per input when each has one output, else a
    list of lists (one per input, num_return_sequences each)."""
    if all(len(outputs) == 1 for outputs in per_input):
        return [outputs[0] for outputs in per_input]
    return per_input[0] if isinstance(inputs, str) else per_input
