"""Which v2 codec a model speaks: `CODECS`, by task name, and the generic JSON codec for the rest.

Codecs are found through the task class's bases, so a custom task that subclasses a built-in one
(registered by entry point under a new name) is served with its parent's tensors and no code; any
other task gets the generic codec: TEXT (or JSON) in, one JSON document per input out.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeserve.server.adapters.kserve_classification_codecs import (
    ImageClassificationCodec,
    TextClassificationCodec,
    TokenClassificationCodec,
    ZeroShotClassificationCodec,
)
from pipeserve.server.adapters.kserve_generation_codecs import Text2TextCodec, TextGenerationCodec, TranslationCodec
from pipeserve.server.adapters.kserve_signature import TaskCodec, TensorSpec, V2Signature
from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.adapters.kserve_text_codecs import FeatureExtractionCodec, FillMaskCodec, QuestionAnsweringCodec
from pipeserve.server.control_plane import ModelDescription
from pipeserve.server.errors import InvalidArgument


def json_value(value: Any) -> Any:
    """What json.dumps cannot write itself: arrays and tensors as nested lists, numpy scalars as numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class GenericCodec(TaskCodec):
    """Any task without a codec of its own: its inputs as TEXT or JSON, its results as JSON text.

    Request parameters go to the task as sent; the results are transformers' Python objects,
    written as one JSON document per input.
    """

    def build_signature(self) -> V2Signature:
        return V2Signature(
            inputs=(
                TensorSpec("TEXT", "BYTES", (-1,), optional=True, doc="one UTF-8 text per input (or send JSON)"),
                TensorSpec("JSON", "BYTES", (-1,), optional=True, doc="one JSON document per input, for structured inputs"),
            ),
            outputs=(TensorSpec("JSON", "BYTES", (-1,), doc="one JSON document per input: the task's result"),),
            parameters=None,
        )

    def decode(self, tensors, params, requested):
        if ("TEXT" in tensors) == ("JSON" in tensors):
            raise InvalidArgument("inputs", "send exactly one of TEXT or JSON")
        if "TEXT" in tensors:
            return super().decode(tensors, params, requested)
        inputs = []
        for i, text in enumerate(utf8_strings(tensors["JSON"], "JSON")):
            try:
                inputs.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"input JSON[{i}]", f"is not JSON: {exc}") from None
        return inputs, dict(params)

    def encode(self, results, params):
        docs = np.empty(len(results), dtype=object)
        docs[:] = [json.dumps(r, default=json_value).encode("utf-8") for r in results]
        return {"JSON": docs}


# Codecs by the task name they serve; a task class finds its codec through its bases.
CODECS: dict[str, type[TaskCodec]] = {c.task: c for c in (
    TextClassificationCodec, FeatureExtractionCodec, TokenClassificationCodec, QuestionAnsweringCodec, FillMaskCodec,
    ZeroShotClassificationCodec, ImageClassificationCodec, TextGenerationCodec, Text2TextCodec, TranslationCodec,
)}

def codec_class(task_class: type) -> type[TaskCodec]:
    for cls in task_class.__mro__:
        name = vars(cls).get("name")
        if name in CODECS:
            return CODECS[name]
    return GenericCodec


class CodecCache:
    """The codec of each model version served, by (name, version), built at its first request;
    a reloaded version (a new description) gets a new one."""

    def __init__(self) -> None:
        self._codecs: dict[tuple[str, int], TaskCodec] = {}

    def get(self, model: ModelDescription) -> TaskCodec:
        key = (model.name, model.version)
        codec = self._codecs.get(key)
        if codec is None or codec.model is not model:
            codec = self._codecs[key] = codec_class(model.task_class)(model)
        return codec
