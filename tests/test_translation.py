"""translation over the wire: what transformers 4.57's translation pipeline gives on the same model
folder (task names, languages, the T5 prefix, defaults and parameters; the reference runs in
.venv-transformers4, all cases in one subprocess)."""

from __future__ import annotations

import grpc
import pytest
from pipeserve.client import pipeline
from pipeserve.v1 import seq2seq_generation_pb2 as seq2seq
from pipeserve.v1 import translation_pb2 as pb
from pipeserve.v1 import translation_pb2_grpc as pb_grpc

from tests import transformers4_generation as t4
from tests.rpc_errors import expect_invalid_argument

MODEL = "t5-translator"
TEXTS = ["the cat reads the old book", "A good server keeps its promises: every request gets an answer."]

# name -> (task as the pipeline is made, inputs, kwargs)
CASES = {
    "the task name picks the model's prefix and settings": ("translation_en_to_fr", TEXTS[0], {}),
    "a batch": ("translation_en_to_fr", TEXTS, {"max_new_tokens": 12}),
    "translation, the languages of the call": ("translation", TEXTS, {"src_lang": "en", "tgt_lang": "fr",
                                                                      "max_new_tokens": 12}),
    "beams and several outputs": ("translation_en_to_fr", TEXTS[1], {"num_beams": 3, "num_return_sequences": 2,
                                                                     "max_new_tokens": 12}),
    "max_length": ("translation_en_to_fr", TEXTS[1], {"max_length": 10}),
    "no_repeat_ngram_size": ("translation_en_to_fr", TEXTS[1], {"no_repeat_ngram_size": 1, "max_new_tokens": 12}),
    "min_new_tokens": ("translation_en_to_fr", TEXTS[0], {"min_new_tokens": 8, "max_new_tokens": 10}),
    "repetition_penalty": ("translation_en_to_fr", TEXTS[1], {"repetition_penalty": 2.0, "max_new_tokens": 12}),
    "return_tensors": ("translation_en_to_fr", TEXTS[0], {"return_tensors": True, "max_new_tokens": 5}),
    "clean_up_tokenization_spaces": ("translation_en_to_fr", TEXTS[1], {"clean_up_tokenization_spaces": True,
                                                                        "max_new_tokens": 12}),
}


@pytest.fixture(scope="module")
def parity(model_repository, tmp_path_factory):
    if not t4.available():
        pytest.skip("no transformers 4.x reference: run tests/prepare.d/transformers4.sh")
    folder = str(model_repository / MODEL)
    theirs = t4.reference([{"task": task, "folder": folder, "inputs": inputs, "kwargs": kwargs}
                           for task, inputs, kwargs in CASES.values()], tmp_path_factory.mktemp("t4"))
    return dict(zip(CASES, theirs))


@pytest.mark.parametrize("name", list(CASES))
def test_results_equal_transformers_4_pipelines(target, parity, name):
    task, inputs, kwargs = CASES[name]
    assert not (isinstance(parity[name], dict) and "error" in parity[name]), parity[name]
    with pipeline(task, target=target) as translate:
        assert translate(inputs, **kwargs) == parity[name]


def test_the_languages_of_config_defaults_give_the_same_translation(target, parity):
    with pipeline("translation", target=target) as translate:  # config.pbtxt's defaults: en -> fr
        assert translate(TEXTS, max_new_tokens=12) == parity["a batch"]


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
