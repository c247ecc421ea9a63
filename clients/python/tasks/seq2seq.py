"""The encoder-decoder generation tasks' shared request parameters (summarization, translation)."""

from __future__ import annotations

from typing import Any

from pipeserve.client.tasks.generation import proto_parameters
from pipeserve.v1 import seq2seq_generation_pb2 as pb

# Set on the request itself, not in its parameters.
REQUEST_FIELDS = frozenset({"clean_up_tokenization_spaces", "src_lang", "tgt_lang"})


def parameters(task: str, params: dict[str, Any]) -> pb.Seq2SeqGenerationParameters:
    """The pipeline's and generate()'s keyword arguments as a Seq2SeqGenerationParameters message
    (typed fields, the rest in `extra`; the server checks every one)."""
    return proto_parameters(pb.Seq2SeqGenerationParameters(),
                            {k: v for k, v in params.items() if k not in REQUEST_FIELDS}, task)


def output(result: Any, key: str) -> dict[str, Any]:
    """One output as transformers 4.x records it: {"<key>_text"} or, with return_tensors, {"<key>_token_ids"}."""
    ids = getattr(result, f"{key}_token_ids")
    if ids:
        return {f"{key}_token_ids": list(ids)}
    return {f"{key}_text": getattr(result, f"{key}_text")}


def shape(per_input: list[list[dict[str, Any]]], inputs: Any) -> Any:
    """transformers 4.x's shapes: a list with one dict per input when each has one output, else a
    list of lists (one per input, num_return_sequences each)."""
    if all(len(outputs) == 1 for outputs in per_input):
        return [outputs[0] for outputs in per_input]
    return per_input[0] if isinstance(inputs, str) else per_input
