"""text-classification / sentiment-analysis over the wire equals transformers' pipeline."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc
from tests.parity import assert_same_results

TEXTS = ["I love using transformers!", "I like pizza", "I hate bugs", "The movie was long, slow and far too loud."]


@pytest.fixture(scope="module")
def reference(model_repository):
    return hf_pipeline("text-classification", model=str(model_repository / "sentiment"))


@pytest.fixture(scope="module")
def clf(target):
    with pipeline("sentiment-analysis", target=target) as remote:
        yield remote


def test_single_text_returns_best_label_like_transformers(clf, reference):
    result = clf("I love using transformers!")
    assert_same_results(result, reference("I love using transformers!"))
    assert result[0]["label"] in {"NEGATIVE", "POSITIVE"}


def test_batch_returns_one_result_per_input(clf, reference):
    assert_same_results(clf(TEXTS), reference(TEXTS))


@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_top_k_shapes_and_scores_match(clf, reference, top_k):
    assert_same_results(clf(TEXTS[0], top_k=top_k), reference(TEXTS[0], top_k=top_k))
    assert_same_results(clf(TEXTS, top_k=top_k), reference(TEXTS, top_k=top_k))


@pytest.mark.parametrize("function", ["softmax", "sigmoid", "none"])
def test_function_to_apply(clf, reference, function):
    assert_same_results(clf(TEXTS, function_to_apply=function, top_k=None),
                        reference(TEXTS, function_to_apply=function, top_k=None))


def test_text_pairs(clf, reference):
    pairs = [{"text": "A man eats.", "text_pair": "Someone is eating."}, {"text": "Hello", "text_pair": "Bye"}]
    assert_same_results(clf(pairs), reference(pairs))


def test_model_named_explicitly_and_by_alias(target, reference):
    with pipeline("text-classification", model="sentiment", target=target) as named:
        assert_same_results(named(TEXTS), reference(TEXTS))


def test_concurrent_requests_batch_without_changing_results(clf, reference):
    expected = reference(TEXTS)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: clf(TEXTS[i % len(TEXTS)]), range(32)))
    for i, result in enumerate(results):
        assert_same_results(result, [expected[i % len(TEXTS)]])


def test_raw_stub_reports_model_and_version(target):
    with grpc.insecure_channel(target) as channel:
        response = pb_grpc.TextClassificationServiceStub(channel).Classify(pb.ClassifyRequest(inputs=["fine"]))
    assert response.model == "sentiment" and response.model_version == 1
    assert len(response.results) == 1 and len(response.results[0].labels) == 1


async def test_asyncio_client(target, reference):
    from pipeserve.client import aio

    async with aio.pipeline("sentiment-analysis", target=target) as remote:
        assert_same_results(await remote(TEXTS), reference(TEXTS))
        assert_same_results(await remote(TEXTS[0], top_k=None), reference(TEXTS[0], top_k=None))
