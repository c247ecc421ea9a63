"""fill-mask over the wire equals transformers' pipeline on the same model."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from transformers import pipeline as hf_pipeline

from pipeserve.client import pipeline
from pipeserve.v1 import fill_mask_pb2 as pb
from pipeserve.v1 import fill_mask_pb2_grpc as pb_grpc
from tests.parity import assert_same_results
from tests.rpc_errors import expect_invalid_argument

TEXTS = [
    "Paris is the [MASK] of France.",
    "The quick brown [MASK] jumps over the lazy dog.",
    "[MASK] is a long word at the start of a much longer sentence than the others, with commas, café and 日本.",
]
TWO_MASKS = "My [MASK] is [MASK] and I live in Berlin."


@pytest.fixture(scope="module")
def reference(model_repository):
    return hf_pipeline("fill-mask", model=str(model_repository / "fill-mask"))


@pytest.fixture(scope="module")
def fill(target):
    with pipeline("fill-mask", target=target) as remote:
        yield remote


def test_single_input_matches_transformers(fill, reference):
    result = fill(TEXTS[0])
    assert_same_results(result, reference(TEXTS[0]))
    assert len(result) == 5 and set(result[0]) == {"score", "token", "token_str", "sequence"}


def test_batches_and_a_list_of_one_match_transformers(fill, reference):
    assert_same_results(fill(TEXTS), reference(TEXTS))
    assert_same_results(fill(TEXTS[:1]), reference(TEXTS[:1]))  # transformers unwraps a list of one


@pytest.mark.parametrize("top_k", [1, 3, 12])
def test_top_k(fill, reference, top_k):
    assert_same_results(fill(TEXTS, top_k=top_k), reference(TEXTS, top_k=top_k))


def test_several_masks_give_one_list_per_mask(fill, reference):
    result = fill(TWO_MASKS, top_k=2)
    assert_same_results(result, reference(TWO_MASKS, top_k=2))
    assert len(result) == 2 and "[MASK]" in result[0][0]["sequence"]
    assert_same_results(fill([TWO_MASKS, TEXTS[0]], top_k=2), reference([TWO_MASKS, TEXTS[0]], top_k=2))


@pytest.mark.parametrize("targets", [["paris", "capital", "city"], "dog", ["zzyzxq", "capital"], ["capital", "capital"]])
def test_targets_limit_the_predictions(fill, reference, targets):
    # "zzyzxq" is outside the vocabulary: it stands for its first token, as in transformers.
    assert_same_results(fill(TEXTS, targets=targets), reference(TEXTS, targets=targets))
    assert_same_results(fill(TEXTS[0], targets=targets, top_k=1), reference(TEXTS[0], targets=targets, top_k=1))


def test_concurrent_requests_batch_without_changing_results(fill):
    inputs = [*TEXTS, TWO_MASKS]
    alone = [fill(text, top_k=3) for text in inputs]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: fill(inputs[i % len(inputs)], top_k=3), range(4 * len(inputs))))
    for i, result in enumerate(together):
        assert_same_results(result, alone[i % len(inputs)])


def test_missing_or_too_many_masks_and_bad_parameters_are_invalid_argument(target):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FillMaskServiceStub(channel)

        def fill(**fields):
            return lambda: stub.FillMask(pb.FillMaskRequest(**fields))

        details = expect_invalid_argument(fill(inputs=[TEXTS[0], "no mask here"]), "inputs[1]")
        assert "[MASK]" in details
        details = expect_invalid_argument(fill(inputs=["[MASK] " * 6]), "inputs[0]")
        assert "at most 5" in details
        expect_invalid_argument(fill(inputs=TEXTS, top_k=-1), "top_k")
        expect_invalid_argument(fill(inputs=TEXTS, top_k=10**9), "top_k")  # torch's topk refuses it in transformers
        expect_invalid_argument(fill(inputs=TEXTS, targets=[" ", ""]), "targets")
        # The mask was cut off by truncation to the model's 512 tokens.
        expect_invalid_argument(fill(inputs=[TEXTS[0], "word " * 600 + "[MASK]"]), "inputs[1]")
        assert len(stub.FillMask(pb.FillMaskRequest(inputs=[TEXTS[0]])).results) == 1


def test_top_k_zero_gives_no_predictions(fill, reference):
    assert_same_results(fill(TEXTS, top_k=0), reference(TEXTS, top_k=0))
    assert_same_results(fill(TWO_MASKS, top_k=0), reference(TWO_MASKS, top_k=0))


@pytest.mark.parametrize("tokenizer_kwargs", [{"add_special_tokens": False}, {"truncation": True, "max_length": 10},
                                              {"max_length": 12, "padding": "max_length"}])
def test_tokenizer_kwargs(fill, reference, tokenizer_kwargs):
    assert_same_results(fill(TEXTS[:2], tokenizer_kwargs=tokenizer_kwargs), reference(TEXTS[:2], tokenizer_kwargs=tokenizer_kwargs))


def test_a_mask_cut_off_by_max_length_and_empty_targets_are_refused(fill):
    with pytest.raises(grpc.RpcError) as caught:
        fill(TEXTS[0], tokenizer_kwargs={"truncation": True, "max_length": 3})  # the mask is the 4th token
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mask" in caught.value.details()
    with pytest.raises(ValueError, match="At least one target"):
        fill(TEXTS[0], targets=[])  # transformers' error too
    with pytest.raises(TypeError, match="tokenizer_kwargs must be a dict"):
        fill(TEXTS[0], tokenizer_kwargs=["truncation"])
