"""text-classification / sentiment-analysis over the wire equals transformers' pipeline."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument

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


# -- transformers' parameters and input forms -------------------------------------------------------------

PAIR = {"text": "A man eats.", "text_pair": "Someone is eating."}


@pytest.mark.parametrize("top_k", [0, 3, None])
def test_top_k_from_the_pipeline_wraps_a_single_text_as_transformers_does(target, model_repository, top_k):
    """transformers wraps a single text's labels in one more list when top_k came from pipeline()."""
    theirs = hf_pipeline("text-classification", model=str(model_repository / "sentiment"), top_k=top_k)
    with pipeline("sentiment-analysis", target=target, top_k=top_k) as ours:
        for inputs in (TEXTS[0], TEXTS, PAIR, [PAIR]):
            assert_same_results(ours(inputs), theirs(inputs))
            assert_same_results(ours(inputs, top_k=1), theirs(inputs, top_k=1))


def test_top_k_zero_gives_no_labels(clf, reference):
    assert_same_results(clf(TEXTS[0], top_k=0), reference(TEXTS[0], top_k=0))
    assert_same_results(clf(TEXTS, top_k=0), reference(TEXTS, top_k=0))


def test_dict_inputs_mixed_batches_and_the_old_pair_form(clf, reference):
    for inputs in ({"text": "only a text"}, PAIR, [PAIR, "a plain text", {"text": "x"}], [[["a text", "its pair"]]]):
        assert_same_results(clf(inputs), reference(inputs))
        assert_same_results(clf(inputs, top_k=None), reference(inputs, top_k=None))
    with pytest.raises(ValueError, match="text pairs"):
        clf([["a text", "its pair"]])  # transformers refuses this form as well
    with pytest.raises(TypeError, match="keys text and text_pair"):
        clf({"text": "a", "pair": "b"})


def test_text_pair_as_a_keyword_pairs_every_text(clf, reference):
    assert_same_results(clf("a text", text_pair="its pair"), reference("a text", text_pair="its pair"))
    assert_same_results(clf(TEXTS, text_pair="the same pair", top_k=2), reference(TEXTS, text_pair="the same pair", top_k=2))


@pytest.mark.parametrize("kwargs", [
    {"truncation": True, "max_length": 6},
    {"max_length": 4},  # alone it truncates, as the tokenizer does
    {"truncation": "longest_first", "max_length": 5, "padding": "max_length"},
    {"add_special_tokens": False},
    {"padding": True, "pad_to_multiple_of": 8, "verbose": False},
])
def test_tokenizer_arguments(clf, reference, kwargs):
    long_texts = [t + " and it went on and on" * 5 for t in TEXTS]
    assert_same_results(clf(long_texts, **kwargs), reference(long_texts, **kwargs))


def test_pair_truncation_strategies(clf, reference):
    long, short = "a long part " * 200, "a short part " * 20
    for truncation, pair in (("only_first", (long, short)), ("only_second", (short, long)),
                             ("longest_first", (long, long)), (True, (short, long))):
        inputs = {"text": pair[0], "text_pair": pair[1]}
        assert_same_results(clf(inputs, truncation=truncation, top_k=None),
                            reference(inputs, truncation=truncation, top_k=None))


def test_function_to_apply_in_any_case_and_as_transformers_enum(clf, reference):
    from transformers.pipelines.text_classification import ClassificationFunction

    for function in ("SIGMOID", "Softmax", ClassificationFunction.NONE):
        assert_same_results(clf(TEXTS, function_to_apply=function), reference(TEXTS, function_to_apply=function))


def test_truncation_false_and_impossible_lengths_are_invalid_argument(target):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TextClassificationServiceStub(channel)

        def classify(inputs=("fine",), **options):
            request = pb.ClassifyRequest(inputs=list(inputs))
            for key, value in options.items():
                setattr(request.tokenizer, key, value)
            return lambda: stub.Classify(request)

        details = expect_invalid_argument(classify(["fine", "word " * 600], truncation=4), "inputs[1]")
        assert "truncation=False" in details
        expect_invalid_argument(classify(max_length=100_000), "max_length")
        expect_invalid_argument(classify(max_length=-1), "max_length")
        # Below the special tokens' count the tokenizer gives up cutting: 600 tokens would reach the model.
        expect_invalid_argument(classify(["word " * 600], truncation=1, max_length=1), "max_length")
        expect_invalid_argument(classify(truncation=42), "tokenizer.truncation")
        # only_second has nothing to cut in a single text: the tokenizer's refusal, as INVALID_ARGUMENT.
        expect_invalid_argument(classify(["word " * 600], truncation=3), "inputs[0]")
        assert stub.Classify(pb.ClassifyRequest(inputs=["word " * 600], tokenizer=tc_options(truncation=1, max_length=8)))
    with pipeline("sentiment-analysis", target=target) as remote:
        with pytest.raises(grpc.RpcError) as caught:
            remote("word " * 600, truncation=False)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def tc_options(**fields):
    from pipeserve.v1 import tokenization_pb2

    return tokenization_pb2.TokenizerOptions(**fields)


def test_return_all_scores_keeps_transformers_4_meaning(clf, model_repository, tmp_path):
    from tests.transformers4 import answer_cases

    calls = [(TEXTS[0], {"return_all_scores": True}), (TEXTS, {"return_all_scores": True}),
             (PAIR, {"return_all_scores": True}), (TEXTS[0], {"return_all_scores": False}),
             (TEXTS, {"return_all_scores": True, "top_k": 1})]
    theirs = answer_cases([("text-classification", model_repository / "sentiment", [inputs], kwargs)
                           for inputs, kwargs in calls], tmp_path)
    for (inputs, kwargs), expected in zip(calls, theirs):
        assert_same_results(clf(inputs, **kwargs), expected)


def test_kserve_pairs_per_row_return_all_scores_and_tokenizer_parameters(target, clf):
    import tritonclient.grpc as triton

    def tensor(name, items):
        array = np.array(items, dtype=object)
        t = triton.InferInput(name, list(array.shape), "BYTES")
        t.set_data_from_numpy(array)
        return t

    with triton.InferenceServerClient(target) as client:
        result = client.infer("sentiment", [tensor("TEXT", ["a text", "another"]), tensor("TEXT_PAIR", ["its pair", ""])],
                              parameters={"return_all_scores": True, "truncation": True, "max_length": 4})
    expected = clf([{"text": "a text", "text_pair": "its pair"}, "another"], return_all_scores=True,
                   truncation=True, max_length=4)
    assert [[label.decode() for label in row] for row in result.as_numpy("LABEL")] == \
        [[e["label"] for e in row] for row in expected] == [["NEGATIVE", "POSITIVE"]] * 2
    np.testing.assert_allclose(result.as_numpy("SCORE"), [[e["score"] for e in row] for row in expected], atol=1e-6)
