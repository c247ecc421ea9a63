"""summarization: transformers 4.x SummarizationPipeline semantics ({"summary_text": ...} per output)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from pipeserve.server.tasks.text2text import Text2TextTask


class SummarizationTask(Text2TextTask):
    name = "summarization"
    result_key = "summary_text"

    def task_params(self, params: dict[str, Any]) -> tuple[str, dict[str, Any], Hashable]:
        # A checkpoint such as bart-large-cnn keeps its summarization settings here, as the
        # pipeline applies them: {"summarization": {"prefix": ..., "max_length": ..., "num_beams": ...}}.
        specific = (getattr(self.context.hf_config, "task_specific_params", None) or {}).get("summarization") or {}
        prefix = specific.get("prefix", self.model_prefix) or ""
        return prefix, {k: v for k, v in specific.items() if k != "prefix"}, ()
