"""The seed's examples (../shared/seed/pipelines-in-pytorch-transformers.md), verbatim, on the default
repository through the SDK's remote pipeline, against transformers' own pipeline on the same model
folder: transformers 5 in this process where it still has the task, transformers 4.57 (one
subprocess of the reference virtualenv for the whole module) for question-answering,
summarization and translation, which transformers 5 removed.

The only line that differs from the seed is the import: `from pipeserve.client import pipeline`,
with the server's address in $PIPESERVE_TARGET.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline as transformers_pipeline

from pipeserve.client import pipeline
from tests.parity import assert_same_results
from tests.transformers4 import answer_cases

# Every task name of the seed's table, with an input of each kind (one, and a batch), and the
# default model the server answers it with.
SEED_TASKS = {
    "sentiment-analysis": ("sentiment", ["I love using transformers!", ["I like pizza", "I hate bugs"]]),
    "text-classification": ("sentiment", ["This movie is disgustingly good !", ["Director tried too much.", "Great!"]]),
    "ner": ("ner", ["My name is Wolfgang and I live in Berlin",
                    ["Hugging Face Inc. is a company based in New York City.", "Angela Merkel met Macron."]]),
    "fill-mask": ("fill-mask", ["Paris is the [MASK] of France.", ["The [MASK] is blue.", "I [MASK] pizza."]]),
    "feature-extraction": ("minilm", ["This is a simple test.", ["A man is eating food.", "Someone is eating."]]),
    "text-generation": ("gpt2", ["The future of AI is", ["Hello, I'm a language model,", "Once upon a time"]]),
}
ZERO_SHOT = ("nli", ["one day I will see the world", ["I have a problem with my iphone", "The match was a draw"]],
             {"candidate_labels": ["travel", "cooking", "dancing"]})
QA = ("qa", [{"question": "Where do I live?", "context": "My name is Wolfgang and I live in Berlin"},
             [{"question": "Who?", "context": "Bob is here."}, {"question": "What?", "context": "A cat sat on a mat."}]])
SUMMARY_TEXT = ("The tower is 324 metres (1,063 ft) tall, about the same height as an 81-storey building, and the "
                "tallest structure in Paris. Its base is square, measuring 125 metres (410 ft) on each side.")
TRANSLATE_TEXT = "The house is wonderful."


@pytest.fixture(autouse=True)
def server_from_the_environment(target, monkeypatch):
    monkeypatch.setenv("PIPESERVE_TARGET", target)


@pytest.fixture(scope="module")
def reference(model_repository):
    """transformers 5's pipeline for a task on a default model folder, made once per pair."""
    made = {}

    def get(task, name):
        if (task, name) not in made:
            made[task, name] = transformers_pipeline(task, model=str(model_repository / name))
        return made[task, name]

    return get


@pytest.fixture(scope="module")
def transformers4(model_repository, tmp_path_factory):
    """transformers 4.57's answers to the seed's question-answering, summarization and translation."""
    cases = {
        "qa-one": ("question-answering", model_repository / "qa", [QA[1][0]], {}),
        "qa-batch": ("question-answering", model_repository / "qa", [QA[1][1]], {}),
        "summary-one": ("summarization", model_repository / "bart-summarizer", [SUMMARY_TEXT], {}),
        "summary-batch": ("summarization", model_repository / "bart-summarizer", [[SUMMARY_TEXT, "Short text."]], {}),
        "translation-one": ("translation", model_repository / "t5-translator", [TRANSLATE_TEXT], {}),
        "translation-batch": ("translation", model_repository / "t5-translator", [[TRANSLATE_TEXT, "I like it."]], {}),
    }
    answers = answer_cases(list(cases.values()), tmp_path_factory.mktemp("transformers4"))
    return dict(zip(cases, answers))


# -- the seed's code, verbatim ------------------------------------------------------------------------


def test_how_to_use_a_pipeline(reference):
    classifier = pipeline("sentiment-analysis")
    result = classifier("I love using transformers!")
    print(result)

    assert_same_results(result, reference("sentiment-analysis", "sentiment")("I love using transformers!"))
    [answer] = result
    assert answer["label"] == "POSITIVE" and answer["score"] > 0.95, result


def test_batch_processing(reference):
    classifier = pipeline("sentiment-analysis")
    result = classifier(["I like pizza", "I hate bugs"])

    assert_same_results(result, reference("sentiment-analysis", "sentiment")(["I like pizza", "I hate bugs"]))
    assert [r["label"] for r in result] == ["POSITIVE", "NEGATIVE"], result
    assert min(r["score"] for r in result) > 0.9, result


def test_device_selection(reference):
    classifier = pipeline("sentiment-analysis", device=0)  # for GPU
    result = classifier("I love using transformers!")

    # The server decides where its models run: device= is taken and changes nothing.
    assert classifier.device == 0
    assert_same_results(result, reference("sentiment-analysis", "sentiment")("I love using transformers!"))


def test_text_generation_with_gpt2(reference, capsys):
    generator = pipeline("text-generation", model="gpt2")
    text = generator("The future of AI is", max_length=30, num_return_sequences=1)
    print(text[0]["generated_text"])

    expected = reference("text-generation", "gpt2")("The future of AI is", max_length=30, num_return_sequences=1)
    assert_same_results(text, expected)
    assert capsys.readouterr().out == expected[0]["generated_text"] + "\n"


def test_specify_model():
    generator = pipeline("text-generation", model="gpt2")
    assert generator.model == "gpt2" and generator("Hello")[0]["generated_text"].startswith("Hello")


# -- every task name of the seed's table ---------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("task", sorted(SEED_TASKS))
def test_each_task_of_the_seed_answers_as_transformers_5_does(task, reference):
    model, inputs = SEED_TASKS[task]
    # The seed names gpt2 for text-generation; the other tasks run on the server's default model.
    remote = pipeline(task, model="gpt2") if task == "text-generation" else pipeline(task)
    local = reference(task, model)
    for item in inputs:
        ours, theirs = remote(item), local(item)
        if task == "feature-extraction":
            assert_same_features(ours, theirs)
        else:
            assert_same_results(ours, theirs)


def test_zero_shot_classification_of_the_seed_table(reference):
    model, inputs, params = ZERO_SHOT
    remote, local = pipeline("zero-shot-classification"), reference("zero-shot-classification", model)
    for item in inputs:
        assert_same_results(remote(item, **params), local(item, **params))


def test_image_classification_of_the_seed_table(reference):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(2)]
    remote, local = pipeline("image-classification"), reference("image-classification", "vit")
    assert_same_results(remote(images[0]), local(images[0]))
    assert_same_results(remote(images), local(images))
    png = io.BytesIO()
    images[0].save(png, format="PNG")
    assert_same_results(remote(png.getvalue()), local(images[0]))


def test_question_answering_answers_as_transformers_4_does(transformers4):
    qa = pipeline("question-answering")
    assert_same_results(qa(QA[1][0]), transformers4["qa-one"])
    assert_same_results(qa(QA[1][1]), transformers4["qa-batch"])
    assert_same_results(qa(question=QA[1][0]["question"], context=QA[1][0]["context"]), transformers4["qa-one"])


def test_summarization_answers_as_transformers_4_does(transformers4):
    summarizer = pipeline("summarization")
    assert_same_results(summarizer(SUMMARY_TEXT), transformers4["summary-one"])
    assert_same_results(summarizer([SUMMARY_TEXT, "Short text."]), transformers4["summary-batch"])


def test_translation_answers_as_transformers_4_does(transformers4):
    translator = pipeline("translation")
    assert_same_results(translator(TRANSLATE_TEXT), transformers4["translation-one"])
    assert_same_results(translator([TRANSLATE_TEXT, "I like it."]), transformers4["translation-batch"])


def assert_same_features(ours, theirs) -> None:
    """feature-extraction results: [1, tokens, hidden] nested lists, or a list of them for a batch."""
    if isinstance(theirs[0][0][0], list):
        assert len(ours) == len(theirs)
        for one, other in zip(ours, theirs):
            assert_same_features(one, other)
        return
    assert np.array(ours).shape == np.array(theirs).shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=1e-5)
