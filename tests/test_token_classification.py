"""token-classification / ner over the wire equals transformers' pipeline on the same model."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import token_classification_pb2 as pb
from pipeserve.v1 import token_classification_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument

TEXTS = [
    "Hello, my name is Wolfgang and I live in Berlin.",
    "Angela Merkel met Emmanuel Macron at the Élysée Palace in Paris.",
    "Hugging Face Inc. is a company based in New York City; its headquarters are in DUMBO.",
    "Unbelievably  spaced   text, with café, naïve 日本語 and an emoji 🙂 too!",
    "x",
]
STRATEGIES = ["none", "simple", "first", "average", "max"]


@pytest.fixture(scope="module")
def reference(model_repository):
    return hf_pipeline("token-classification", model=str(model_repository / "ner"))


@pytest.fixture(scope="module")
def ner(target):
    with pipeline("ner", target=target) as remote:
        yield remote


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_aggregation_strategy_matches_transformers(ner, reference, strategy):
    assert_same_results(ner(TEXTS, aggregation_strategy=strategy), reference(TEXTS, aggregation_strategy=strategy))
    assert_same_results(ner(TEXTS[1], aggregation_strategy=strategy), reference(TEXTS[1], aggregation_strategy=strategy))


def test_default_output_has_token_fields_and_offsets_into_the_text(ner, reference):
    result = ner(TEXTS[0])
    assert_same_results(result, reference(TEXTS[0]))
    assert result and set(result[0]) == {"entity", "score", "index", "word", "start", "end"}
    for entity in result:
        assert TEXTS[0][entity["start"] : entity["end"]].lower() == entity["word"].removeprefix("##")


def test_grouped_entities_span_the_original_text(ner):
    for text, entities in zip(TEXTS, ner(TEXTS, aggregation_strategy="simple")):
        for entity in entities:
            assert set(entity) == {"entity_group", "score", "word", "start", "end"}
            assert 0 <= entity["start"] < entity["end"] <= len(text)


@pytest.mark.parametrize("ignore", [[], ["O", "I-MISC"], ["PER", "LOC"]])
def test_ignore_labels(ner, reference, ignore):
    assert_same_results(ner(TEXTS, ignore_labels=ignore), reference(TEXTS, ignore_labels=ignore))
    assert_same_results(ner(TEXTS, ignore_labels=ignore, aggregation_strategy="simple"),
                        reference(TEXTS, ignore_labels=ignore, aggregation_strategy="simple"))


def test_a_list_of_one_stays_a_list(ner, reference):
    assert_same_results(ner(TEXTS[:1]), reference(TEXTS[:1]))


def test_concurrent_requests_batch_without_changing_results(ner):
    alone = [ner(text, aggregation_strategy=s) for text in TEXTS for s in ("none", "average")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: ner(TEXTS[i // 2 % len(TEXTS)], aggregation_strategy=("none", "average")[i % 2]),
                                 range(3 * len(alone))))
    for i, result in enumerate(together):
        assert_same_results(result, alone[i % len(alone)])


def test_bad_parameters_name_the_field(target):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenClassificationServiceStub(channel)
        expect_invalid_argument(lambda: stub.ClassifyTokens(pb.ClassifyTokensRequest(inputs=["a"], aggregation_strategy=42)),
                                "aggregation_strategy")
        expect_invalid_argument(lambda: stub.ClassifyTokens(pb.ClassifyTokensRequest(inputs=[])), "inputs")
        response = stub.ClassifyTokens(pb.ClassifyTokensRequest(inputs=["still fine"]))
    assert response.model == "ner" and len(response.results) == 1
