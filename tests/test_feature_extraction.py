"""feature-extraction on the real all-MiniLM-L6-v2, over the wire."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline

TEXTS = ["A man is eating food.", "Someone is having a meal.", "The stock market fell sharply today."]


@pytest.fixture(scope="module")
def minilm(model_repository):
    folder = str(model_repository / "minilm")
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def embed(target):
    with pipeline("feature-extraction", target=target) as remote:
        yield remote


def in_process_mean(minilm, texts):
    tokenizer, model = minilm
    with torch.inference_mode():
        out = []
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
            hidden = model(**enc).last_hidden_state[0]
            out.append(hidden.mean(dim=0))
    return torch.stack(out)


def test_token_level_output_equals_transformers_pipeline(embed, model_repository):
    reference = hf_pipeline("feature-extraction", model=str(model_repository / "minilm"))
    ours = embed(TEXTS[0])
    theirs = reference(TEXTS[0])
    assert np.array(ours).shape == np.array(theirs).shape  # [1, tokens, 384]
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)
    batch = embed(TEXTS)
    for ours_one, text in zip(batch, TEXTS):
        np.testing.assert_allclose(np.array(ours_one), np.array(reference(text)), atol=1e-5)


def test_mean_pooling_matches_in_process_model(embed, minilm):
    ours = np.array(embed(TEXTS, pooling="mean"))
    np.testing.assert_allclose(ours, in_process_mean(minilm, TEXTS).numpy(), atol=1e-5)


def test_normalized_vectors_have_unit_length_and_rank_paraphrases_closer(embed):
    vectors = np.array(embed(TEXTS, pooling="mean", normalize=True))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    paraphrase = float(vectors[0] @ vectors[1])
    unrelated = float(vectors[0] @ vectors[2])
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)


def test_cls_and_max_pooling(embed, minilm):
    tokenizer, model = minilm
    with torch.inference_mode():
        hidden = model(**tokenizer(TEXTS[2], return_tensors="pt")).last_hidden_state[0]
    np.testing.assert_allclose(np.array(embed(TEXTS[2], pooling="cls")), hidden[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.array(embed(TEXTS[2], pooling="max")), hidden.max(dim=0).values.numpy(), atol=1e-5)


def test_long_input_is_truncated_to_the_configured_maximum(embed):
    long_text = "word " * 1000
    tokens = np.array(embed(long_text))
    assert tokens.shape == (1, 256, 384)  # minilm's config: max_sequence_length 256


@pytest.mark.parametrize("kwargs", [{"truncation": True, "tokenize_kwargs": {"max_length": 4}},
                                    {"tokenize_kwargs": {"max_length": 3}},
                                    {"tokenize_kwargs": {"add_special_tokens": False, "padding": True}}])
def test_truncation_and_tokenize_kwargs_equal_transformers(embed, model_repository, kwargs):
    reference = hf_pipeline("feature-extraction", model=str(model_repository / "minilm"))
    import copy

    for text in (TEXTS[0], TEXTS):
        # transformers writes truncation into the tokenize_kwargs dict it is given: each call its own.
        ours, theirs = embed(text, **copy.deepcopy(kwargs)), reference(text, **copy.deepcopy(kwargs))
        if isinstance(text, str):
            ours, theirs = [ours], [theirs]
        for one, other in zip(ours, theirs):
            np.testing.assert_allclose(np.array(one), np.array(other), atol=1e-5)


def test_return_tensors_gives_torch_tensors_as_transformers_does(embed, model_repository):
    reference = hf_pipeline("feature-extraction", model=str(model_repository / "minilm"))
    ours, theirs = embed(TEXTS[0], return_tensors=True), reference(TEXTS[0], return_tensors=True)
    assert isinstance(ours, torch.Tensor) and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    batch = embed(TEXTS, return_tensors=True)
    assert [t.shape for t in batch] == [t.shape for t in reference(TEXTS, return_tensors=True)]
    assert embed(TEXTS[0], return_tensors=True, pooling="mean").shape == (384,)


def test_truncation_false_refuses_what_the_model_cannot_take(embed):
    import grpc

    assert np.array(embed("word " * 100, truncation=False)).shape == (1, 102, 384)
    with pytest.raises(grpc.RpcError) as caught:
        embed("word " * 1000, truncation=False)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "256" in caught.value.details()
