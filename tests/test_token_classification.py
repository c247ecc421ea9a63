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


# -- pre-split words, caller's offsets and windows over long texts ----------------------------------------

WORDS = "Hello my name is Wolfgang and I live in Berlin . Angela Merkel met Macron at the Élysée café naïve DUMBO".split()


def long_text(seed: int, words: int = 700) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS + ["unbelievably", "Hugging", "Face"]) for _ in range(words))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_inputs_split_into_words(ner, reference, strategy):
    one, batch = WORDS[:10], [WORDS[:5], WORDS[5:12], ["Paris"]]
    for inputs, kwargs in ((one, {}), (batch, {}), (one, {"delimiter": "__"}), (batch, {"delimiter": ""})):
        assert_same_results(ner(inputs, is_split_into_words=True, aggregation_strategy=strategy, **kwargs),
                            reference(inputs, is_split_into_words=True, aggregation_strategy=strategy, **kwargs))


def test_offset_mapping_replaces_the_tokenizers_spans(ner, reference):
    text = "Hello Wolfgang from Berlin"
    spans = [(0, 0), (0, 5), (6, 14), (15, 19), (20, 26), (0, 0)]
    odd = [(0, 0), (1, 3), (3, 9), (9, 12), (12, 20), (0, 0)]
    for offsets in (spans, odd):
        for strategy in ("none", "simple", "average"):
            assert_same_results(ner(text, offset_mapping=offsets, aggregation_strategy=strategy),
                                reference(text, offset_mapping=offsets, aggregation_strategy=strategy))
    # A batch: each input its own spans (transformers gives every input the first one's).
    other = "Angela Merkel"
    other_spans = [(0, 0), (0, 6), (7, 9), (9, 13), (0, 0)]
    assert ner([text, other], offset_mapping=[odd, other_spans]) == \
        [ner(text, offset_mapping=odd), ner(other, offset_mapping=other_spans)]
    assert_same_results(ner([text, other], offset_mapping=[odd, other_spans])[1],
                        reference(other, offset_mapping=other_spans))
    with pytest.raises(ValueError, match="same batch size"):
        ner([text, other], offset_mapping=[odd])


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("strategy", [None, "simple", "first", "average", "max"])
def test_stride_labels_long_texts_in_windows_as_transformers_does(ner, reference, strategy):
    kwargs = {"aggregation_strategy": strategy} if strategy else {}
    texts = [long_text(1), "Hello Wolfgang", long_text(2, 1500)]
    for stride in (0, 32, 200):
        assert_same_results(ner(texts, stride=stride, **kwargs), reference(texts, stride=stride, **kwargs))
    words = long_text(3).split()
    assert_same_results(ner(words, stride=16, is_split_into_words=True, **kwargs),
                        reference(words, stride=16, is_split_into_words=True, **kwargs))


def test_windows_of_many_inputs_share_forward_passes_without_changing_results(ner):
    texts = [long_text(seed, 600 + 100 * seed) for seed in range(4)]
    alone = [ner(text, stride=64, aggregation_strategy="first") for text in texts]
    assert ner(texts, stride=64, aggregation_strategy="first") == alone
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: ner(texts[i % 4], stride=64, aggregation_strategy="first"), range(8)))
    assert together == alone + alone


def test_bad_words_offsets_and_strides_are_invalid_argument(target, ner):
    text = long_text(5)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TokenClassificationServiceStub(channel)

        def classify(**fields):
            return lambda: stub.ClassifyTokens(pb.ClassifyTokensRequest(**fields))

        simple = pb.AGGREGATION_STRATEGY_SIMPLE
        expect_invalid_argument(classify(inputs=[text], stride=8, aggregation_strategy=pb.AGGREGATION_STRATEGY_NONE),
                                "stride")
        expect_invalid_argument(classify(inputs=[text], stride=512, aggregation_strategy=simple), "stride")
        expect_invalid_argument(classify(inputs=[text], stride=-1, aggregation_strategy=simple), "stride")
        expect_invalid_argument(classify(inputs=[text], stride=510, aggregation_strategy=simple), "stride")
        assert "windows" in expect_invalid_argument(classify(inputs=["x", text], stride=509, aggregation_strategy=simple),
                                                    "inputs[1]")
        expect_invalid_argument(classify(inputs=["a"], words=[pb.Words(words=["a"])]), "words")
        expect_invalid_argument(classify(words=[pb.Words(words=["a"]), pb.Words()]), "inputs[1]")
        spans = pb.TokenOffsets(spans=[pb.CharSpan(start=0, end=0)])
        expect_invalid_argument(classify(inputs=["a", "b"], offset_mapping=[spans]), "offset_mapping")
        expect_invalid_argument(classify(inputs=["Hello Wolfgang"], offset_mapping=[spans]), "inputs[0].offset_mapping")
        bad = pb.TokenOffsets(spans=[pb.CharSpan(start=5, end=2)] * 4)
        expect_invalid_argument(classify(inputs=["Hello Wolfgang"], offset_mapping=[bad]), "inputs[0].offset_mapping")
        four = pb.TokenOffsets(spans=[pb.CharSpan(start=0, end=0)] * 4)
        expect_invalid_argument(classify(inputs=["Hello Wolfgang"], offset_mapping=[four], stride=2), "inputs[0].offset_mapping")
        assert stub.ClassifyTokens(pb.ClassifyTokensRequest(inputs=["Hello Wolfgang"], offset_mapping=[four])).results
    with pytest.raises(ValueError, match="list of tokens"):
        ner("not split", is_split_into_words=True)


def test_kserve_takes_words_offsets_and_stride(target, ner):
    import numpy as np
    import tritonclient.grpc as triton

    def tensor(name, array, datatype):
        t = triton.InferInput(name, list(array.shape), datatype)
        t.set_data_from_numpy(array)
        return t

    words = np.array([["Hello", "Wolfgang", ""], ["Angela", "Merkel", "met"]], dtype=object)
    # Pre-split inputs: spans within each word ("Merkel" is two tokens), padded with [-1, -1].
    offsets = np.array([[[0, 0], [0, 5], [0, 8], [0, 0], [-1, -1], [-1, -1]],
                        [[0, 0], [0, 6], [0, 2], [2, 6], [0, 3], [0, 0]]], dtype=np.int64)
    with triton.InferenceServerClient(target) as client:
        result = client.infer("ner", [tensor("WORDS", words, "BYTES"), tensor("OFFSET_MAPPING", offsets, "INT64")],
                              parameters={"aggregation_strategy": "simple", "delimiter": " "})
        windows = client.infer("ner", [tensor("TEXT", np.array([long_text(7)], dtype=object), "BYTES")],
                               parameters={"stride": 40, "aggregation_strategy": "first"})
    expected = ner([["Hello", "Wolfgang"], ["Angela", "Merkel", "met"]], is_split_into_words=True,
                   offset_mapping=[offsets[0, :4].tolist(), offsets[1].tolist()], aggregation_strategy="simple")
    counts = result.as_numpy("ENTITY_COUNT")
    assert counts.tolist() == [len(e) for e in expected]
    for row, entities in enumerate(expected):
        assert [w.decode() for w in result.as_numpy("WORD")[row][: counts[row]]] == [e["word"] for e in entities]
        assert result.as_numpy("START")[row][: counts[row]].tolist() == [e["start"] for e in entities]
    assert windows.as_numpy("ENTITY_COUNT").tolist() == [len(ner(long_text(7), stride=40, aggregation_strategy="first"))]
