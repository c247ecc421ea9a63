"""What summarization and translation requests share: pipeserve.v1.Seq2SeqGenerationParameters as
transformers' names (typed fields and `extra`), and clean_up_tokenization_spaces."""

from __future__ import annotations

from typing import Any

from pipeserve.server.adapters.generation_parameters import message_parameters


def parameters(request: Any) -> dict[str, Any]:
    """The parameters a SummarizeRequest or TranslateRequest sets (unset ones are left out)."""
    params = message_parameters(request.parameters)
    params["clean_up_tokenization_spaces"] = request.clean_up_tokenization_spaces
    return params


def token_ids_or_text(result: dict[str, Any], key: str) -> dict[str, Any]:
    """A Summary's or Translation's fields from one output: its text, or its token ids (return_tensors)."""
    ids = result.get(f"{key}_token_ids")
    if ids is not None:
        return {f"{key}_token_ids": ids}
    return {f"{key}_text": result[f"{key}_text"]}
