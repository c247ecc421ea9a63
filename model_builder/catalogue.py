"""The catalogue: which models the default repository holds, and the serving config of each.

A serving config is the fields of config.pbtxt as a dict shaped like the pipeserve.v1.ModelConfig
message (as JSON spells it); build.py writes it with `write_model_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeserve.model_builder.models import (
    NER_LABELS,
    NLI_LABELS,
    SENTIMENT_LABELS,
    bert_task_model,
    build_distilbert_base,
    build_gpt2_small,
    make_bart,
    make_gpt2,
    make_gpt2_chat,
    make_minilm,
    make_t5,
    make_vit,
)
from pipeserve.model_builder.sentiment import make_sentiment


@dataclass(frozen=True)
class CatalogueEntry:
    """One model of the default repository: its name, task, what it is, the builder of its files
    and its serving config (config.pbtxt's fields; `name` there is always this entry's name)."""

    name: str
    task: str
    description: str
    # Writes the model files (weights, config.json, tokenizer / processor) into a folder.
    make_files: Callable[[Path], None] = field(repr=False)
    serving_config: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def default_for_task(self) -> bool:
        return bool(self.serving_config.get("default_for_task", False))


def serving_config(
    name: str,
    task: str,
    *,
    default_for_task: bool,
    max_batch_size: int = 32,
    queue_delay_us: int | None = 2000,
    max_sequence_length: int = 0,
    max_concurrent_sequences: int | None = None,
    defaults: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """config.pbtxt's fields for a model of the default repository, served by the eager backend."""
    fields: dict[str, Any] = {
        "name": name,
        "task": task,
        "backend": "eager",
        # source stays empty: the model files are in the model folder itself.
        "source": {},
        "max_batch_size": max_batch_size,
        "default_for_task": default_for_task,
    }
    if max_sequence_length:
        fields["max_sequence_length"] = max_sequence_length
    if queue_delay_us is not None:
        fields["dynamic_batching"] = {"max_queue_delay_microseconds": queue_delay_us}
    if max_concurrent_sequences is not None:
        fields["generation"] = {"max_concurrent_sequences": max_concurrent_sequences}
    if defaults:
        fields["parameters"] = {"defaults": dict(defaults)}
    return fields


def _entry(name: str, task: str, description: str, make_files: Callable[[Path], None],
           **config: Any) -> CatalogueEntry:
    return CatalogueEntry(name, task, description, make_files, serving_config(name, task, **config))


DEFAULT_MODELS: list[CatalogueEntry] = [
    _entry(
        "sentiment", "text-classification",
        "a demo sentiment classifier: the real all-MiniLM-L6-v2 with a NEGATIVE/POSITIVE head trained here "
        "on generated sentences (BertForSequenceClassification)",
        make_sentiment,
        default_for_task=True, max_batch_size=32, queue_delay_us=2000,
    ),
    _entry(
        "minilm", "feature-extraction",
        "the real sentence-transformers all-MiniLM-L6-v2 (BertModel, 384-dim embeddings)",
        make_minilm,
        default_for_task=True, max_sequence_length=256,
    ),
    _entry(
        "ner", "token-classification",
        "BertForTokenClassification (tiny, random) with CoNLL-2003 BIO labels",
        bert_task_model("BertForTokenClassification", labels=NER_LABELS),
        default_for_task=True,
    ),
    _entry(
        "qa", "question-answering",
        "BertForQuestionAnswering (tiny, random), extractive",
        bert_task_model("BertForQuestionAnswering", model_max_length=384),
        default_for_task=True, max_sequence_length=384,
    ),
    _entry(
        "fill-mask", "fill-mask",
        "BertForMaskedLM (tiny, random) with the BERT uncased vocabulary",
        bert_task_model("BertForMaskedLM"),
        default_for_task=True,
    ),
    _entry(
        "nli", "zero-shot-classification",
        "BertForSequenceClassification (tiny, random) with NLI labels for zero-shot classification",
        bert_task_model("BertForSequenceClassification", labels=NLI_LABELS),
        default_for_task=True,
    ),
    _entry(
        "gpt2", "text-generation",
        "GPT2LMHeadModel (tiny, random) with a byte-level BPE tokenizer trained here",
        make_gpt2,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
    ),
    _entry(
        "gpt2-chat", "text-generation",
        "GPT2LMHeadModel (tiny, random; gpt2's weights) whose tokenizer has a chat template, for conversations",
        make_gpt2_chat,
        default_for_task=False, queue_delay_us=None, max_concurrent_sequences=32,
    ),
    _entry(
        "bart-summarizer", "summarization",
        "BartForConditionalGeneration (tiny, random) with a byte-level BPE tokenizer trained here",
        make_bart,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
    ),
    _entry(
        "t5-translator", "translation",
        "T5ForConditionalGeneration (tiny, random) with a Unigram tokenizer trained here, en->fr",
        make_t5,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
        defaults={"src_lang": "en", "tgt_lang": "fr"},
    ),
    _entry(
        "vit", "image-classification",
        "ViTForImageClassification (32x32 images, tiny, random) with labels cat/dog/bird",
        make_vit,
        default_for_task=True,
    ),
    _entry(
        "tiny-classifier", "text-classification",
        "BertForSequenceClassification (hidden 64, random) for batching tests and benchmarks",
        bert_task_model("BertForSequenceClassification", hidden=64, labels=SENTIMENT_LABELS),
        default_for_task=False, max_batch_size=32, queue_delay_us=2000,
    ),
]

# Large models for `make bench`; built only when named in `only`.
BENCH_MODELS: list[CatalogueEntry] = [
    _entry(
        "distilbert-base", "text-classification",
        "DistilBertForSequenceClassification at DistilBERT-base size (66M parameters, random)",
        build_distilbert_base,
        default_for_task=False, max_batch_size=32, queue_delay_us=2000,
    ),
    _entry(
        "gpt2-small", "text-generation",
        "GPT2LMHeadModel at GPT-2-small size (768 wide, 12 layers, random) with the BPE tokenizer",
        build_gpt2_small,
        default_for_task=False, queue_delay_us=None, max_concurrent_sequences=32,
    ),
]


def select(only: set[str] | None) -> list[CatalogueEntry]:
    """The entries to build: every default model, or those named in `only` (bench models too),
    in catalogue order. An unknown name raises ValueError."""
    if only is None:
        return list(DEFAULT_MODELS)
    known = {entry.name: entry for entry in DEFAULT_MODELS + BENCH_MODELS}
    unknown = sorted(set(only) - known.keys())
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(known)}")
    return [entry for entry in DEFAULT_MODELS + BENCH_MODELS if entry.name in only]
