"""Task codecs by name. A codec builds a task's request and shapes its response like transformers."""

from __future__ import annotations

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.feature_extraction import FeatureExtractionCodec
from pipeserve.client.tasks.fill_mask import FillMaskCodec
from pipeserve.client.tasks.image_classification import ImageClassificationCodec
from pipeserve.client.tasks.question_answering import QuestionAnsweringCodec
from pipeserve.client.tasks.summarization import SummarizationCodec
from pipeserve.client.tasks.text_classification import TextClassificationCodec
from pipeserve.client.tasks.text_generation import TextGenerationCodec
from pipeserve.client.tasks.token_classification import TokenClassificationCodec
from pipeserve.client.tasks.translation import TranslationCodec
from pipeserve.client.tasks.zero_shot_classification import ZeroShotClassificationCodec

CODECS: list[type[TaskCodec]] = [
    TextClassificationCodec,
    FeatureExtractionCodec,
    TokenClassificationCodec,
    QuestionAnsweringCodec,
    FillMaskCodec,
    ZeroShotClassificationCodec,
    ImageClassificationCodec,
    TextGenerationCodec,
    SummarizationCodec,
    TranslationCodec,
]


def codec_for(task: str) -> type[TaskCodec]:
    for codec in CODECS:
        if task == codec.task or task in codec.aliases:
            return codec
    if task.startswith("translation_"):
        return codec_for("translation")
    known = sorted({n for c in CODECS for n in (c.task, *c.aliases)})
    raise ValueError(f"unknown task {task!r}; known: {', '.join(known)}")
