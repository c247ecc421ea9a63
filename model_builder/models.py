"""The model builders: each writes one tiny transformers model (weights, config.json and its
tokenizer or image processor) into a folder.

Every model is a real transformers class with a real config, so serving one takes the code paths
a hub checkpoint takes; only the sizes are tiny. Weights are random except minilm's; the caller
seeds torch first (build.py), so they are the same on every build.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeserve.model_builder.corpora import TRANSLATION_PREFIX
from pipeserve.model_builder.model_tokenizers import (
    GPT2_EOS,
    bart_tokenizer,
    bert_tokenizer,
    clear_fixed_truncation_and_padding,
    gpt2_tokenizer,
    minilm_package_dir,
    t5_tokenizer,
)

SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")
NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
NLI_LABELS = ("contradiction", "neutral", "entailment")
VIT_LABELS = ("cat", "dog", "bird")

# Keys that transformers copies into tokenizer_config.json from how the tokenizer was loaded
# (a local folder) or from the source tokenizer.json's training-time truncation / padding (the
# package's pins max_length 128): not a property of the model, and misleading to a reader.
_LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only", "max_length", "stride",
                             "truncation_strategy", "pad_to_multiple_of")


def _save(folder: Path, model: Any, *preprocessors: Any) -> None:
    # transformers 5 writes safetensors only (save_pretrained lost its safe_serialization switch);
    # build.py verifies it after every build.
    model.eval()
    model.save_pretrained(folder)
    for preprocessor in preprocessors:
        init_kwargs = getattr(preprocessor, "init_kwargs", None)
        if isinstance(init_kwargs, dict):
            for key in _LOAD_TIME_TOKENIZER_KEYS:
                init_kwargs.pop(key, None)
        preprocessor.save_pretrained(folder)


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


def bert_task_model(model_class_name: str, *, model_max_length: int = 512, hidden: int = 32,
                    labels: Iterable[str] | None = None) -> Callable[[Path], None]:
    """A builder of a tiny BERT with the head `model_class_name` and the real BERT vocabulary."""
    def make(folder: Path) -> None:
        import transformers

        tokenizer = bert_tokenizer(model_max_length)
        extra = _labels(labels) if labels is not None else {}
        config = _tiny_bert_config(len(tokenizer), hidden=hidden, **extra)
        model = getattr(transformers, model_class_name)(config)
        _save(folder, model, tokenizer)

    return make


def make_minilm(folder: Path) -> None:
    """Copies the real all-MiniLM-L6-v2 (BertModel + tokenizer) through from_pretrained."""
    from transformers import AutoModel, AutoTokenizer

    source = minilm_package_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    clear_fixed_truncation_and_padding(tokenizer)
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

    tokenizer = gpt2_tokenizer(model_max_length=n_positions)
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


def make_gpt2(folder: Path) -> None:
    _gpt2_files(folder, n_embd=64, n_layer=2, n_head=4)


def make_gpt2_chat(folder: Path) -> None:
    """make_gpt2's model, with a tokenizer that has a chat template (GPT2_CHAT_TEMPLATE)."""
    from pipeserve.model_builder.model_tokenizers import gpt2_chat_tokenizer

    make_gpt2(folder)
    gpt2_chat_tokenizer(model_max_length=512).save_pretrained(folder)


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


def make_bart(folder: Path) -> None:
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    tokenizer = bart_tokenizer(model_max_length=512)
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


def make_t5(folder: Path) -> None:
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = t5_tokenizer(model_max_length=512)
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


def make_vit(folder: Path) -> None:
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

    tokenizer = bert_tokenizer(512)
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
