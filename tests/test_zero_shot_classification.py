"""zero-shot-classification over the wire equals transformers' pipeline on the same NLI model."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import zero_shot_classification_pb2 as pb
from pipeserve.v1 import zero_shot_classification_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument

TEXTS = [
    "I have a problem with my iphone that needs to be resolved asap!!",
    "The match ended in a draw after extra time.",
    "Angela Merkel is a politician in Germany and leader of the CDU",
]
LABELS = ["urgent", "not urgent", "phone", "tablet", "computer", "sports", "politics"]


@pytest.fixture(scope="module")
def reference(model_repository):
    return hf_pipeline("zero-shot-classification", model=str(model_repository / "nli"))


@pytest.fixture(scope="module")
def classify(target):
    with pipeline("zero-shot-classification", target=target) as remote:
        yield remote


def test_single_input_matches_transformers(classify, reference):
    result = classify(TEXTS[0], candidate_labels=LABELS)
    assert_same_results(result, reference(TEXTS[0], candidate_labels=LABELS))
    assert result["sequence"] == TEXTS[0] and sorted(result["labels"]) == sorted(LABELS)
    assert result["scores"] == sorted(result["scores"], reverse=True)
    assert abs(sum(result["scores"]) - 1) < 1e-5


@pytest.mark.parametrize("multi_label", [False, True])
def test_batch_and_multi_label(classify, reference, multi_label):
    assert_same_results(classify(TEXTS, candidate_labels=LABELS, multi_label=multi_label),
                        reference(TEXTS, candidate_labels=LABELS, multi_label=multi_label))
    assert_same_results(classify(TEXTS[:1], candidate_labels=LABELS, multi_label=multi_label),
                        reference(TEXTS[:1], candidate_labels=LABELS, multi_label=multi_label))


def test_template_positional_and_comma_separated_labels(classify, reference):
    template = "The topic of this text is {}."
    assert_same_results(classify(TEXTS, "sports, politics,phone", hypothesis_template=template),
                        reference(TEXTS, "sports, politics,phone", hypothesis_template=template))


def test_one_label_scores_entailment_against_contradiction(classify, reference):
    result = classify(TEXTS[1], candidate_labels=["sports"])
    assert_same_results(result, reference(TEXTS[1], candidate_labels=["sports"]))
    assert result["labels"] == ["sports"] and 0 < result["scores"][0] < 1


def test_concurrent_requests_with_different_labels_keep_their_results(classify):
    label_sets = [LABELS, ["sports", "politics"], LABELS[:3]]
    cases = [(text, labels) for text in TEXTS for labels in label_sets]
    alone = [classify(text, candidate_labels=labels) for text, labels in cases]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: classify(cases[i % len(cases)][0], candidate_labels=cases[i % len(cases)][1]),
                                 range(3 * len(cases))))
    for i, result in enumerate(together):
        assert_same_results(result, alone[i % len(cases)])


def test_bad_parameters_name_the_field(target):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ZeroShotClassificationServiceStub(channel)

        def classify(**fields):
            return lambda: stub.ClassifyZeroShot(pb.ClassifyZeroShotRequest(**fields))

        expect_invalid_argument(classify(inputs=TEXTS), "candidate_labels")
        expect_invalid_argument(classify(inputs=TEXTS, candidate_labels=["a"], hypothesis_template="no slot"),
                                "hypothesis_template")
        for template in ("{0} {1}", "{label}", "{:>999999999}", "{!r}", "unclosed {"):
            expect_invalid_argument(classify(inputs=TEXTS, candidate_labels=["a"], hypothesis_template=template),
                                    "hypothesis_template")
        expect_invalid_argument(classify(inputs=[], candidate_labels=["a"]), "inputs")
        response = stub.ClassifyZeroShot(pb.ClassifyZeroShotRequest(inputs=TEXTS[:1], candidate_labels=["a", "b"]))
    assert response.model == "nli" and list(response.results[0].labels) in (["a", "b"], ["b", "a"])


def test_sequences_keyword_and_argument_errors_like_transformers(classify, reference):
    assert_same_results(classify(sequences=TEXTS, candidate_labels=LABELS[:3]), reference(sequences=TEXTS, candidate_labels=LABELS[:3]))
    with pytest.raises(ValueError, match="extra arguments"):
        classify(TEXTS[0], ["a"], "surplus")
    with pytest.raises(ValueError, match="at least one label"):
        classify(TEXTS[0], candidate_labels=[])
    for template in ("", "no slot"):
        with pytest.raises(ValueError, match="hypothesis_template"):
            classify(TEXTS[0], candidate_labels=["a"], hypothesis_template=template)
