"""summarization over the wire: transformers 4.x pipeline semantics, outputs equal to generate()'s."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
from pipeserve.client import pipeline
from pipeserve.v1 import seq2seq_generation_pb2 as seq2seq
from pipeserve.v1 import summarization_pb2 as pb
from pipeserve.v1 import summarization_pb2_grpc as pb_grpc

from tests.generation_helpers import Seq2SeqReference
from tests.rpc_errors import expect_invalid_argument

MODEL = "bart-summarizer"
SHORT = 12  # new tokens: enough to tell outputs apart, few enough to keep the tests quick
DOCS = [
    "The server reads a long letter in the morning.",
    "Batching merges many small requests into one large forward pass, which is faster per item. A good server "
    "keeps its promises: every request gets an answer or a clear error, and the queue never grows without bound.",
    "café naïve 日本語",
]


@pytest.fixture(scope="module")
def reference(model_repository) -> Seq2SeqReference:
    return Seq2SeqReference(model_repository / MODEL)


@pytest.fixture(scope="module")
def summarize(target):
    with pipeline("summarization", target=target) as remote:
        yield remote


def test_the_models_generation_config_is_the_default(summarize, reference):
    assert summarize(DOCS[0]) == [{"summary_text": reference(DOCS[0])[0]}]


def test_greedy_equals_generate_alone_and_batched(summarize, reference):
    expected = [reference(doc, max_new_tokens=SHORT)[0] for doc in DOCS]
    assert summarize(DOCS, max_new_tokens=SHORT) == [{"summary_text": text} for text in expected]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda i: summarize(DOCS[i % 3], max_new_tokens=SHORT), range(6)))
    assert together == [[{"summary_text": expected[i % 3]}] for i in range(6)]


@pytest.mark.parametrize("kwargs", [
    {"num_beams": 3, "max_new_tokens": SHORT},
    {"num_beams": 3, "early_stopping": True, "length_penalty": 0.5, "max_new_tokens": SHORT},
    {"min_length": 20, "max_length": 24},
    {"no_repeat_ngram_size": 2, "max_new_tokens": SHORT},
    {"repetition_penalty": 1.3, "max_new_tokens": SHORT},
])
def test_generation_parameters_act_as_in_generate(summarize, reference, kwargs):
    assert summarize(DOCS[1], **kwargs) == [{"summary_text": reference(DOCS[1], **kwargs)[0]}]


def test_several_outputs_per_input_keep_transformers_shapes(summarize, reference):
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=SHORT)
    expected = reference(DOCS[0], **beams)
    assert summarize(DOCS[0], **beams) == [{"summary_text": t} for t in expected]
    both = summarize(DOCS[:2], **beams)
    assert len(both) == 2 and all(len(outputs) == 2 for outputs in both)
    assert both[0] == [{"summary_text": t} for t in expected]


def test_seeded_sampling_equals_generate_after_manual_seed(summarize, reference):
    sampled = dict(do_sample=True, top_k=0, temperature=1.2, max_new_tokens=12)
    ours = summarize(DOCS[1], seed=9, **sampled)
    assert ours == [{"summary_text": reference(DOCS[1], seed=9, **sampled)[0]}]
    assert summarize([DOCS[1], DOCS[0]], seed=9, **sampled)[0] == ours[0]  # a neighbour changes nothing


@pytest.mark.parametrize("fields, field", [
    (dict(num_beams=0), "num_beams"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(max_new_tokens=100_000), "max_new_tokens"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(min_length=50, max_length=10), "min_length"),
])
def test_bad_parameters_are_invalid_argument_naming_the_field(target, fields, field):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SummarizationServiceStub(channel)
        request = pb.SummarizeRequest(inputs=DOCS[:1], parameters=seq2seq.Seq2SeqGenerationParameters(**fields))
        expect_invalid_argument(lambda: stub.Summarize(request), field)
