"""Every parameter transformers' pipelines take for the encoder tasks is served or refused on purpose.

The SDK's parameter tables (clients/python/tasks/parameters.py and each task codec) are checked
against transformers' own signatures: `_sanitize_parameters` of each pipeline class (transformers
5; for question-answering, which transformers 5 removed, 4.57's, read from the reference
virtualenv's source), what their `**kwargs` go to (the tokenizer's `__call__`, zero-shot's keys),
`Pipeline.__call__`'s own keyword arguments and `pipeline()`'s. A parameter a new transformers adds
fails here until it is put in a table: served, ignored (with why) or refused (with why). No server
is needed: refusals happen in the SDK, before any call.
"""

from __future__ import annotations

import ast
import inspect
import logging
import re

import pytest
import transformers
from transformers import pipelines as hf
from transformers.pipelines.base import Pipeline
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from pipeserve.client import aio, pipeline
from pipeserve.client.pipeline import MODEL_PARTS, PLACEMENT_ARGUMENTS, REFUSED_ARGUMENTS
from pipeserve.client.tasks import codec_for
from pipeserve.client.tasks.parameters import TOKENIZER_ARGUMENTS
from tests.transformers4 import VENV

# task -> the transformers 5 pipeline class whose _sanitize_parameters it serves
PIPELINES = {
    "text-classification": hf.TextClassificationPipeline,
    "token-classification": hf.TokenClassificationPipeline,
    "fill-mask": hf.FillMaskPipeline,
    "zero-shot-classification": hf.ZeroShotClassificationPipeline,
    "feature-extraction": hf.FeatureExtractionPipeline,
    "image-classification": hf.ImageClassificationPipeline,
}
# Where a pipeline's **kwargs (or a dict parameter) go: the tokenizer's own arguments.
TOKENIZER_CALL = {name for name, p in inspect.signature(PreTrainedTokenizerBase.__call__).parameters.items()
                  if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}


def sanitize_parameters(cls: type) -> tuple[set[str], bool]:
    """The named parameters of cls._sanitize_parameters and whether it takes **kwargs."""
    parameters = inspect.signature(cls._sanitize_parameters).parameters
    named = {name for name, p in parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_transformers_5_has_the_pipelines_these_tables_follow():
    assert set(PIPELINES) <= set(hf.SUPPORTED_TASKS)
    assert "question-answering" not in hf.SUPPORTED_TASKS, "transformers has question-answering again: check 5.x's"


@pytest.mark.parametrize("task", sorted(PIPELINES))
def test_every_parameter_of_the_pipeline_is_served_ignored_or_refused(task):
    table = codec_for(task).parameters
    named, _ = sanitize_parameters(PIPELINES[task])
    missing = named - table.names()
    assert not missing, f"{task}: transformers takes {sorted(missing)}, which the SDK neither serves nor refuses"
    call_options = {name for name, p in inspect.signature(Pipeline.__call__).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert call_options == {"num_workers", "batch_size"}, "Pipeline.__call__ changed: update CALL_OPTIONS"
    assert call_options <= table.names()


def test_what_kwargs_go_to_is_covered_too():
    # text-classification hands its **kwargs to the tokenizer.
    assert sanitize_parameters(hf.TextClassificationPipeline)[1]
    assert "tokenizer_kwargs" in inspect.getsource(hf.TextClassificationPipeline._sanitize_parameters)
    missing = TOKENIZER_CALL - TOKENIZER_ARGUMENTS.names()
    assert not missing, f"the tokenizer takes {sorted(missing)}: put them in TOKENIZER_ARGUMENTS"
    assert TOKENIZER_ARGUMENTS.names() <= codec_for("text-classification").parameters.names()
    # zero-shot reads named keys out of its **kwargs.
    source = inspect.getsource(hf.ZeroShotClassificationPipeline._sanitize_parameters)
    keys = set(re.findall(r'"(\w+)" in kwargs', source))
    assert keys == {"candidate_labels", "hypothesis_template", "multi_label"}, keys
    assert keys <= set(codec_for("zero-shot-classification").parameters.served)
    # feature-extraction swallows its **kwargs (transformers ignores them); its tokenize_kwargs and
    # fill-mask's tokenizer_kwargs are the tokenizer's arguments, checked by TOKENIZER_ARGUMENTS.
    assert "tokenize_kwargs" in codec_for("feature-extraction").parameters.served
    assert "tokenizer_kwargs" in codec_for("fill-mask").parameters.served


def test_question_answering_follows_transformers_4():
    source = VENV / "lib"
    files = sorted(source.glob("python3*/site-packages/transformers/pipelines/question_answering.py"))
    if not files:
        pytest.skip(f"{VENV} is missing: run bash tests/prepare.d/transformers4.sh")
    tree = ast.parse(files[0].read_text(encoding="utf-8"))
    pipeline_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "QuestionAnsweringPipeline")
    method = next(n for n in pipeline_class.body if isinstance(n, ast.FunctionDef) and n.name == "_sanitize_parameters")
    named = {a.arg for a in method.args.args + method.args.kwonlyargs} - {"self"}
    assert method.args.kwarg is not None  # 4.x swallows question=, context=, X= and data= there
    table = codec_for("question-answering").parameters
    assert not named - table.names(), sorted(named - table.names())


def test_every_argument_of_transformers_pipeline_function_is_handled():
    arguments = {name for name, p in inspect.signature(transformers.pipeline).parameters.items()
                 if p.kind is not inspect.Parameter.VAR_KEYWORD}
    # task and model are ours too; `token` is pipeserve's bearer token (transformers': a hub token).
    handled = {"task", "model", "token"} | set(PLACEMENT_ARGUMENTS) | set(MODEL_PARTS) | set(REFUSED_ARGUMENTS)
    assert not arguments - handled, sorted(arguments - handled)
    init = {name for name in inspect.signature(Pipeline.__init__).parameters} - {"self", "kwargs", "model", "task"}
    assert not init - handled, sorted(init - handled)


@pytest.mark.parametrize("task", [*sorted(PIPELINES), "question-answering"])
def test_refused_and_unknown_parameters_are_type_errors_naming_them(task):
    clf = pipeline(task, target="127.0.0.1:1")  # never called: the SDK refuses before sending
    inputs = {"question-answering": {"question": "Who?", "context": "Bob."}, "image-classification": b"x"}.get(task, "x")
    table = clf.codec.parameters
    for name, why in table.refused.items():
        with pytest.raises(TypeError, match=re.escape(name)) as caught:
            clf(inputs, **{name: 1})
        assert why in str(caught.value)
    with pytest.raises(TypeError, match="unknown parameter 'no_such_parameter'"):
        clf(inputs, no_such_parameter=1)
    assert all(why for why in [*table.refused.values(), *table.ignored.values()]), "every entry says why"


def test_tokenizer_arguments_inside_their_dicts_are_checked_the_same_way():
    fill = pipeline("fill-mask", target="127.0.0.1:1")
    with pytest.raises(TypeError, match="return_tensors"):
        fill("a [MASK]", tokenizer_kwargs={"return_tensors": "pt"})
    embed = pipeline("feature-extraction", target="127.0.0.1:1")
    with pytest.raises(TypeError, match="unknown parameter 'nope'"):
        embed("a", tokenize_kwargs={"nope": 1})
    with pytest.raises(ValueError, match="defined twice"):
        embed("a", truncation=True, tokenize_kwargs={"truncation": True})


def test_callables_and_tensors_of_this_process_cannot_cross_the_wire():
    import numpy as np
    import torch

    with pytest.raises(TypeError, match="cannot cross the wire"):
        pipeline("image-classification", target="127.0.0.1:1")(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(TypeError, match="cannot cross the wire"):
        pipeline("image-classification", target="127.0.0.1:1")([torch.zeros(3, 4, 4)])
    with pytest.raises(TypeError, match="must be an integer"):
        pipeline("fill-mask", target="127.0.0.1:1")("a [MASK]", top_k=lambda: 3)


# -- pipeline()'s own arguments ---------------------------------------------------------------------


@pytest.mark.parametrize("device", [0, -1, "cpu", "cuda:0", "mps", "torch"])
def test_device_is_taken_and_changes_nothing(target, device, caplog):
    import torch

    if device == "torch":
        device = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="pipeserve.client"):
        clf = pipeline("sentiment-analysis", target=target, device=device)
    assert clf.device == device
    assert "the server places the model" in caplog.text
    with pipeline("sentiment-analysis", target=target) as plain:
        assert clf(["I like pizza", "I hate bugs"]) == plain(["I like pizza", "I hate bugs"])
    clf.close()


def test_other_placement_arguments_are_taken_too(target):
    with pipeline("sentiment-analysis", target=target, device_map="auto", dtype="float16", torch_dtype="auto",
                  batch_size=8, num_workers=2, framework="pt", binary_output=True) as clf:
        assert clf.device is None
        assert clf("I love using transformers!")[0]["label"] == "POSITIVE"
        assert clf("I love using transformers!", batch_size=4, num_workers=0)[0]["label"] == "POSITIVE"


async def test_the_asyncio_pipeline_takes_device_too(target):
    async with aio.pipeline("sentiment-analysis", target=target, device=0) as clf:
        assert clf.device == 0
        assert (await clf("I love using transformers!"))[0]["label"] == "POSITIVE"


def test_a_bad_device_and_arguments_a_server_cannot_honour_are_type_errors():
    with pytest.raises(TypeError, match="device must be"):
        pipeline("sentiment-analysis", target="127.0.0.1:1", device=[0])
    with pytest.raises(TypeError, match="tokenizer"):
        pipeline("sentiment-analysis", target="127.0.0.1:1", tokenizer="bert-base-uncased")
    for name in REFUSED_ARGUMENTS:
        with pytest.raises(TypeError, match=name):
            pipeline("sentiment-analysis", target="127.0.0.1:1", **{name: "x"})
    # The model's own parts, named as the model is: what the server loads anyway.
    pipeline("sentiment-analysis", "sentiment", target="127.0.0.1:1", tokenizer="sentiment", config="sentiment").close()
