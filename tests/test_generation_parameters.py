"""Every parameter of transformers' generation pipelines and of generate(): served (and then equal
to transformers' pipeline on the same model folder) or refused on purpose, with the reason.

The lists are read from transformers itself (5.x in-process; 4.57's summarization and translation
pipelines in .venv-transformers4), so that a parameter a future transformers adds fails here
until server/tasks/generation_params.py serves it or refuses it.
"""

from __future__ import annotations

import inspect
import re

import grpc
import pytest
import torch
import transformers
from pipeserve.client import aio, pipeline
from pipeserve.server.tasks import generation_params as params
from pipeserve.server.tasks import text2text, text_generation
from pipeserve.server.tasks.translation import TranslationTask
from transformers import pipeline as hf_pipeline
from transformers.pipelines.text_generation import ReturnType

from tests import transformers4_generation as t4
from tests.conftest import ROOT

MODEL = "gpt2"
PROMPT = "The future of AI is"
LONG = "Batching merges many small requests into one large forward pass, which is faster per item, " * 3


def named(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}


TABLES = {"served": set(params.GENERATE_PARAMETERS), "no effect": set(params.NO_EFFECT),
          "refused": set(params.REFUSED)}
ACCOUNTED = set().union(*TABLES.values()) | {"generation_config", "inputs"}


def test_each_parameter_is_served_dropped_or_refused_exactly_once():
    for a, names in TABLES.items():
        for b, others in TABLES.items():
            if a < b:
                assert not names & others, (a, b, names & others)
    assert params.ENGINE_PARAMETERS <= set(params.GENERATE_PARAMETERS)
    assert all(why for why, _ in params.REFUSED.values())


def test_transformers_5_text_generation_pipeline_and_generate_are_covered():
    from transformers.generation.utils import GenerationMixin
    from transformers.pipelines.base import Pipeline
    from transformers.pipelines.text_generation import TextGenerationPipeline

    pipeline_names = named(TextGenerationPipeline._sanitize_parameters)
    assert pipeline_names <= text_generation.PIPELINE_PARAMETERS, pipeline_names - text_generation.PIPELINE_PARAMETERS
    config = {k for k in vars(transformers.GenerationConfig()) if not k.startswith("_")}
    assert config <= ACCOUNTED, sorted(config - ACCOUNTED)
    generate = named(GenerationMixin.generate)
    assert generate <= ACCOUNTED, sorted(generate - ACCOUNTED)
    call = named(Pipeline.__call__) - {"inputs"}
    assert call <= set(params.NO_EFFECT), call


def test_transformers_4_summarization_and_translation_pipelines_and_generate_are_covered(tmp_path):
    if not t4.available():
        pytest.skip("no transformers 4.x reference: run tests/prepare.d/transformers4.sh")
    (signatures,) = t4.reference([{"signatures": True}], tmp_path)
    own = text2text.PIPELINE_PARAMETERS | TranslationTask.task_parameters
    for pipeline_class in ("text2text", "summarization", "translation"):
        assert set(signatures[pipeline_class]) <= own, (pipeline_class, set(signatures[pipeline_class]) - own)
    assert set(signatures["generation_config"]) <= ACCOUNTED, sorted(set(signatures["generation_config"]) - ACCOUNTED)
    assert set(signatures["generate"]) <= ACCOUNTED, sorted(set(signatures["generate"]) - ACCOUNTED)
    # The defaults 4.57's "is this value the default?" compares with, as text2text.py keeps them.
    assert signatures["generation_config_defaults"] == text2text.GENERATION_CONFIG_DEFAULTS_4X


def test_the_readme_tables_name_every_parameter():
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"`([a-z_]+)`", readme))
    everything = ACCOUNTED - {"inputs"} | text_generation.PIPELINE_PARAMETERS | text2text.PIPELINE_PARAMETERS
    assert everything <= listed, sorted(everything - listed)


# -- text-generation: results equal transformers 5's pipeline ----------------------------------

@pytest.fixture(scope="module")
def gen(target):
    with pipeline("text-generation", target=target) as remote:
        yield remote


@pytest.fixture(scope="module")
def theirs(model_repository):
    return hf_pipeline("text-generation", model=str(model_repository / MODEL))


def _token(theirs, text: str) -> int:
    return theirs.tokenizer(text, add_special_tokens=False)["input_ids"][0]


# (prompt, kwargs, seed): the seed's example first, then a parameter (or a few) at a time.
CASES = {
    "the seed's example": (PROMPT, {"max_length": 30, "num_return_sequences": 1}, None),
    "max_length truncates a longer prompt": (LONG, {"max_length": 12}, None),
    "min_new_tokens": (PROMPT, {"min_new_tokens": 20, "max_new_tokens": 24}, None),
    "min_length": (PROMPT, {"min_length": 25, "max_new_tokens": 24}, None),
    "no_repeat_ngram_size": (PROMPT, {"no_repeat_ngram_size": 2, "max_new_tokens": 24}, None),
    "no_repeat_ngram_size 1": (PROMPT, {"no_repeat_ngram_size": 1, "max_new_tokens": 24}, None),
    "repetition_penalty": (PROMPT, {"repetition_penalty": 1.4, "max_new_tokens": 16}, None),
    "num_beams": (PROMPT, {"num_beams": 3, "max_new_tokens": 12}, None),
    "num_beams, num_return_sequences": (PROMPT, {"num_beams": 4, "num_return_sequences": 3, "max_new_tokens": 10},
                                        None),
    "beams, early_stopping, length_penalty": (
        PROMPT, {"num_beams": 3, "early_stopping": True, "length_penalty": -0.5, "max_new_tokens": 12}, None),
    "beams, early_stopping never": (PROMPT, {"num_beams": 2, "early_stopping": "never", "max_new_tokens": 8}, None),
    "beams, no_repeat_ngram_size": (PROMPT, {"num_beams": 3, "no_repeat_ngram_size": 2, "max_new_tokens": 12}, None),
    "bad_words_ids": (PROMPT, {"bad_words_ids": "BAD", "max_new_tokens": 12}, None),
    "sequence_bias": (PROMPT, {"sequence_bias": "BIAS", "max_new_tokens": 12}, None),
    "suppress_tokens": (PROMPT, {"suppress_tokens": "SUPPRESS", "max_new_tokens": 12}, None),
    "begin_suppress_tokens": (PROMPT, {"begin_suppress_tokens": "SUPPRESS", "max_new_tokens": 6}, None),
    "eos_token_id": (PROMPT, {"eos_token_id": "EOS", "max_new_tokens": 20}, None),
    "forced_eos_token_id": (PROMPT, {"forced_eos_token_id": "EOS", "max_length": 12}, None),
    "stop_sequence": (PROMPT, {"stop_sequence": "STOP", "max_new_tokens": 20}, None),
    "encoder_repetition_penalty (whole sequence)": (PROMPT, {"encoder_repetition_penalty": 1.5, "max_new_tokens": 12},
                                                    None),
    "renormalize_logits (whole sequence)": (PROMPT, {"renormalize_logits": True, "max_new_tokens": 12}, None),
    "exponential_decay_length_penalty (whole sequence)": (
        PROMPT, {"exponential_decay_length_penalty": [3, 1.5], "max_new_tokens": 12}, None),
    "prompt_lookup_num_tokens (whole sequence)": (PROMPT + PROMPT, {"prompt_lookup_num_tokens": 3,
                                                                     "max_new_tokens": 12}, None),
    "guidance_scale (whole sequence)": (PROMPT, {"guidance_scale": 1.5, "max_new_tokens": 8}, None),
    "return_full_text false": (PROMPT, {"return_full_text": False, "max_new_tokens": 8}, None),
    "return_tensors": (PROMPT, {"return_tensors": True, "max_new_tokens": 8}, None),
    "return_type new text": (PROMPT, {"return_type": "NEW_TEXT", "max_new_tokens": 8}, None),
    "return_text": (PROMPT, {"return_text": True, "max_new_tokens": 8}, None),
    "clean_up_tokenization_spaces": (PROMPT + " ,", {"clean_up_tokenization_spaces": True, "max_new_tokens": 12}, None),
    "skip_special_tokens false": (PROMPT, {"skip_special_tokens": False, "min_length": 0, "max_new_tokens": 30}, None),
    "prefix": (PROMPT, {"prefix": "Once upon a time. ", "max_new_tokens": 8}, None),
    "prefix with max_length": (PROMPT, {"prefix": "Once upon a time. ", "max_length": 20}, None),
    "handle_long_generation hole": (LONG * 6, {"handle_long_generation": "hole", "max_new_tokens": 8}, None),
    "truncation and max_length": (LONG, {"truncation": True, "max_length": 10}, None),
    "tokenizer_encode_kwargs": (LONG, {"tokenizer_encode_kwargs": {"truncation": True, "max_length": 7},
                                       "max_new_tokens": 5}, None),
    "add_special_tokens": (PROMPT, {"add_special_tokens": True, "max_new_tokens": 6}, None),
    "a batch of prompts": ([PROMPT, "Hello", LONG], {"max_new_tokens": 6}, None),
    "generation_config": (PROMPT, {"generation_config": "CONFIG"}, None),
    "generation_config and a parameter": (PROMPT, {"generation_config": "CONFIG", "no_repeat_ngram_size": 1}, None),
    "use_cache (no effect)": (PROMPT, {"use_cache": False, "max_new_tokens": 6}, None),
    "sampling with the pipeline's defaults": (PROMPT, {"do_sample": True, "max_new_tokens": 12}, 5),
    "top_k, top_p": (PROMPT, {"do_sample": True, "top_k": 20, "top_p": 0.8, "max_new_tokens": 12}, 6),
    "min_p": (PROMPT, {"do_sample": True, "min_p": 0.1, "max_new_tokens": 12}, 7),
    "typical_p": (PROMPT, {"do_sample": True, "typical_p": 0.6, "max_new_tokens": 12}, 8),
    "epsilon_cutoff": (PROMPT, {"do_sample": True, "epsilon_cutoff": 0.002, "max_new_tokens": 12}, 9),
    "eta_cutoff": (PROMPT, {"do_sample": True, "eta_cutoff": 0.002, "top_k": 0, "max_new_tokens": 12}, 10),
    "sampling with a bad word and a minimum": (PROMPT, {"do_sample": True, "bad_words_ids": "BAD", "min_new_tokens": 8,
                                                        "max_new_tokens": 12}, 11),
    "beam sampling (whole sequence)": (PROMPT, {"do_sample": True, "num_beams": 2, "max_new_tokens": 8}, 12),
    "top_h (whole sequence)": (PROMPT, {"do_sample": True, "top_h": 0.5, "max_new_tokens": 8}, 13),
    "watermarking_config (whole sequence)": (PROMPT, {"watermarking_config": "WATERMARK", "max_new_tokens": 8}, None),
}


def resolved(kwargs: dict, theirs) -> dict:
    """Placeholders as token ids and objects of the served model."""
    tokens = theirs.tokenizer(" the future of the world", add_special_tokens=False)["input_ids"]
    fill = {
        "BAD": [[tokens[0]], tokens[1:3]],
        "BIAS": [[[tokens[0]], 4.0], [tokens[1:3], -3.0]],
        "SUPPRESS": tokens[:3],
        "EOS": tokens[1],
        "STOP": theirs.tokenizer.decode(tokens[1:2]).strip() or "the",
        "CONFIG": transformers.GenerationConfig(max_new_tokens=9, num_beams=2),
        "WATERMARK": transformers.WatermarkingConfig(bias=3.0),
        "NEW_TEXT": ReturnType.NEW_TEXT,
    }
    return {k: fill.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_text_generation_equals_transformers_pipeline(gen, theirs, name):
    prompt, kwargs, seed = CASES[name]
    kwargs = resolved(kwargs, theirs)
    if seed is not None:
        torch.manual_seed(seed)
    expected = theirs(prompt, **kwargs)
    assert gen(prompt, **kwargs, **({"seed": seed} if seed is not None else {})) == expected


async def test_the_asyncio_pipeline_gives_the_same(target, theirs):
    async with aio.pipeline("text-generation", target=target) as remote:
        for name in ("the seed's example", "num_beams, num_return_sequences", "no_repeat_ngram_size"):
            prompt, kwargs, _ = CASES[name]
            assert await remote(prompt, **kwargs) == theirs(prompt, **kwargs), name


@pytest.mark.parametrize("kwargs, field", [
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"num_return_sequences": 2, "do_sample": False}, "num_return_sequences"),
    ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
    ({"max_new_tokens": "many"}, "max_new_tokens"),
    ({"top_k": 2.5}, "top_k"),
    ({"temperature": "hot", "do_sample": True}, "temperature"),
    ({"bad_words_ids": [[10**7]]}, "bad_words_ids"),
    ({"bad_words_ids": [[]]}, "bad_words_ids[0]"),
    ({"sequence_bias": [[1, 2]]}, "sequence_bias[0][0]"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
    ({"handle_long_generation": "tail"}, "handle_long_generation"),
    ({"return_full_text": True, "return_text": True}, "return_text"),
    ({"return_type": "numbers"}, "return_type"),
    ({"padding": "max_length", "max_length": 20}, "padding"),
    ({"truncation": "sideways"}, "truncation"),
    ({"tools": "a tool"}, "tools"),
    ({"tokenizer_encode_kwargs": {"return_tensors": "pt"}}, "tokenizer_encode_kwargs.return_tensors"),
    ({"num_beams": 2, "logprobs": True}, "logprobs"),
    ({"output_scores": True}, "output_scores"),
    ({"return_dict_in_generate": True}, "return_dict_in_generate"),
    ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
    ({"dola_layers": "high"}, "dola_layers"),
    ({"constraints": [1]}, "constraints"),
    ({"low_memory": True, "num_beams": 2}, "low_memory"),
    ({"custom_generate": "someone/repo"}, "custom_generate"),
    ({"trust_remote_code": True}, "trust_remote_code"),
    ({"num_assistant_tokens": 5}, "num_assistant_tokens"),
    ({"no_such_parameter": 1}, "no_such_parameter"),
    ({"generation_config": {"no_such_field": 1}}, "generation_config.no_such_field"),
])
def test_bad_or_unservable_parameters_are_invalid_argument_naming_the_field(gen, kwargs, field):
    with pytest.raises(grpc.RpcError) as info:
        gen(PROMPT, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(f"{field}: "), info.value.details()


@pytest.mark.parametrize("name", ["logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "streamer",
                                  "assistant_model", "tokenizer"])
def test_what_cannot_cross_the_wire_is_a_type_error_in_the_sdk(gen, name):
    with pytest.raises(TypeError, match=name):
        gen(PROMPT, **{name: object()})


def test_objects_that_are_not_plain_values_are_a_type_error_naming_the_parameter(gen):
    with pytest.raises(TypeError, match="bad_words_ids"):
        gen(PROMPT, bad_words_ids=[[object()]])


def test_accepted_parameters_without_effect_change_nothing(gen):
    plain = gen(PROMPT, max_new_tokens=6)
    assert gen(PROMPT, max_new_tokens=6, use_cache=False, cache_implementation="static", batch_size=4,
               num_beam_groups=1, output_scores=False, penalty_alpha=0.0) == plain
