"""translation over the wire: transformers 4.x pipeline semantics (task names, languages, T5 prefixes)."""

from __future__ import annotations

import grpc
import pytest
from pipeserve.client import pipeline
from pipeserve.model_builder import TRANSLATION_PREFIX
from pipeserve.v1 import seq2seq_generation_pb2 as seq2seq
from pipeserve.v1 import translation_pb2 as pb
from pipeserve.v1 import translation_pb2_grpc as pb_grpc

from tests.generation_helpers import Seq2SeqReference
from tests.rpc_errors import expect_invalid_argument

MODEL = "t5-translator"
TEXTS = ["the cat reads the old book", "A good server keeps its promises: every request gets an answer."]


@pytest.fixture(scope="module")
def reference(model_repository) -> Seq2SeqReference:
    return Seq2SeqReference(model_repository / MODEL)


def expected(reference: Seq2SeqReference, text: str, **kwargs) -> str:
    # The model's task_specific_params["translation_en_to_fr"]: the prefix, max_length 64, greedy.
    return reference(TRANSLATION_PREFIX + text, max_length=64, num_beams=1, **kwargs)[0]


def test_the_task_name_picks_the_models_prefix_and_settings(target, reference):
    with pipeline("translation_en_to_fr", target=target) as translate:
        assert translate(TEXTS[0]) == [{"translation_text": expected(reference, TEXTS[0])}]


@pytest.mark.parametrize("task, kwargs", [
    ("translation_en_to_fr", {}),
    ("translation", {}),  # the languages of config.pbtxt's defaults
    ("translation", {"src_lang": "en", "tgt_lang": "fr"}),
])
def test_task_names_and_languages_pick_the_same_translation(target, reference, task, kwargs):
    with pipeline(task, target=target) as translate:
        result = translate(TEXTS, max_new_tokens=12, **kwargs)
    assert result == [{"translation_text": expected(reference, t, max_new_tokens=12)} for t in TEXTS]


def test_beam_search_equals_generate(target, reference):
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12)
    with pipeline("translation_en_to_fr", target=target) as translate:
        result = translate(TEXTS[1], **beams)
    assert result == [{"translation_text": t} for t in reference(TRANSLATION_PREFIX + TEXTS[1], max_length=64, **beams)]


def test_a_pair_the_model_does_not_translate_is_invalid_argument(target):
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.TranslationServiceStub(channel)
        details = expect_invalid_argument(
            lambda: stub.Translate(pb.TranslateRequest(inputs=TEXTS[:1], src_lang="en", tgt_lang="de")), "tgt_lang")
        assert "en->fr" in details
        expect_invalid_argument(
            lambda: stub.Translate(pb.TranslateRequest(inputs=TEXTS[:1], src_lang="xx", tgt_lang="fr")), "src_lang")
        expect_invalid_argument(lambda: stub.Translate(pb.TranslateRequest(
            inputs=TEXTS[:1], parameters=seq2seq.Seq2SeqGenerationParameters(no_repeat_ngram_size=-1))),
            "no_repeat_ngram_size")
