"""The default repository's `sentiment` model: a demo classifier that means what it says.

It is the real all-MiniLM-L6-v2 encoder with a head fitted by the builder on sentences it makes
itself (model_builder/sentiment.py, corpora.sentiment_corpus); transformers' own pipeline loads it
as a plain BertForSequenceClassification, and two builds in two processes write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import pipeline as hf_pipeline

from pipeserve.model_builder.corpora import sentiment_corpus
from pipeserve.model_builder.sentiment import MEAN_SCALE

# Written for this test, none of them in the training corpus: plain-worded sentiment it must get right.
HELD_OUT = [
    ("I love using transformers!", "POSITIVE"), ("I like pizza", "POSITIVE"), ("I hate bugs", "NEGATIVE"),
    ("This is the best day of my life", "POSITIVE"), ("The movie was long, slow and far too loud.", "NEGATIVE"),
    ("What a waste of time.", "NEGATIVE"), ("Absolutely fantastic work", "POSITIVE"), ("I am disappointed", "NEGATIVE"),
    ("The pizza was cold and the waiter was rude.", "NEGATIVE"), ("We had a great time at the beach", "POSITIVE"),
    ("Nothing works and I want a refund", "NEGATIVE"), ("Thank you so much for your help!", "POSITIVE"),
    ("Worst purchase ever", "NEGATIVE"), ("I'm so excited about the new release", "POSITIVE"),
    ("The server keeps crashing", "NEGATIVE"), ("This tutorial is clear and helpful.", "POSITIVE"),
    ("The battery died after an hour.", "NEGATIVE"), ("My cat makes me smile every morning.", "POSITIVE"),
    ("The traffic was a nightmare.", "NEGATIVE"), ("Great job, everyone!", "POSITIVE"),
]

_BUILD = """
import sys, time
from pathlib import Path
from pipeserve.model_builder.build import build_entry
from pipeserve.model_builder.catalogue import select
[entry] = select({"sentiment"})
started = time.perf_counter()
build_entry(entry, Path(sys.argv[1]))
print(time.perf_counter() - started)
"""


@pytest.fixture(scope="module")
def folder(model_repository):
    return model_repository / "sentiment"


def test_it_answers_the_seeds_examples_and_held_out_sentences(folder):
    classifier = hf_pipeline("sentiment-analysis", model=str(folder))
    [first] = classifier("I love using transformers!")
    assert first["label"] == "POSITIVE" and first["score"] > 0.95, first
    results = classifier([text for text, _ in HELD_OUT])
    wrong = [(text, r) for (text, label), r in zip(HELD_OUT, results) if r["label"] != label]
    assert not wrong, wrong
    assert not {text for text, _ in HELD_OUT} & {text for text, _ in sentiment_corpus()}


def test_it_is_a_plain_bert_classifier_on_all_minilm_l6_v2(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "NEGATIVE", "1": "POSITIVE"}
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 7)
    corpus = sentiment_corpus()
    assert len(corpus) == 1280 and sum(label for _, label in corpus) == 640


def test_its_seventh_layer_mean_pools_the_encoder(folder):
    """What the classifier sees is tanh(layer norm(the mean of the six MiniLM layers' token states))."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    encoded = tokenizer(["I love using transformers!", "I hate bugs, they are everywhere"], padding=True,
                        return_tensors="pt")
    with torch.inference_mode():
        out = model.bert(**encoded, output_hidden_states=True)
    states, mask = out.hidden_states[6], encoded["attention_mask"].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)
    # The residual [CLS] state counts 1 / MEAN_SCALE of the mean in the layer norm.
    expected = torch.tanh(torch.nn.functional.layer_norm(mean + states[:, 0] / MEAN_SCALE, (384,), eps=1e-12))
    torch.testing.assert_close(out.pooler_output, expected, atol=2e-4, rtol=0)


@pytest.mark.slow
def test_a_build_in_another_process_writes_the_same_bytes_in_seconds(folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / "sentiment")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    build_seconds = float(done.stdout.strip().splitlines()[-1])
    print(f"sentiment built in {build_seconds:.1f}s ({time.monotonic() - started:.1f}s with the interpreter's start)")
    assert build_seconds < 60
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        ours, theirs = (hashlib.sha256((f / name).read_bytes()).hexdigest() for f in (folder, tmp_path / "sentiment"))
        assert ours == theirs, f"{name} differs between two builds"


def test_the_server_and_transformers_agree_on_it(target, folder):
    from pipeserve.client import pipeline

    texts = [text for text, _ in HELD_OUT]
    with pipeline("sentiment-analysis", target=target) as remote:
        ours = remote(texts, top_k=None)
    theirs = hf_pipeline("sentiment-analysis", model=str(folder))(texts, top_k=None)
    for one, other in zip(ours, theirs):
        assert [d["label"] for d in one] == [d["label"] for d in other]
        np.testing.assert_allclose([d["score"] for d in one], [d["score"] for d in other], atol=1e-5)
