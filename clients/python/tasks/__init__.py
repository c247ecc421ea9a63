"""Task codecs by name. A codec builds a task's request and shapes its response like transformers."""

from __future__ import annotations

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.feature_extraction import FeatureExtractionCodec
from pipeserve.client.tasks.text_classification import TextClassificationCodec

CODECS: list[type[TaskCodec]] = [
    TextClassificationCodec,
    FeatureExtractionCodec,
]


def codec_for(task: str) -> type[TaskCodec]:
    for codec in CODECS:
        if task == codec.task or task in codec.aliases:
            return codec
    if task.startswith("translation_"):
        return codec_for("translation")
    known = sorted({n for c in CODECS for n in (c.task, *c.aliases)})
    raise ValueError(f"unknown task {task!r}; known: {', '.join(known)}")
