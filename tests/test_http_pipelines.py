"""The typed pipelines over HTTP: `POST /v1/pipelines/{task}` answers every task with what the Python
SDK (which shapes gRPC answers as transformers does) returns for the same call."""

from __future__ import annotations

import base64
import io
import math

import httpx
import pytest

from pipeserve.client import pipeline


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (30, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()
PNG_B64 = base64.b64encode(PNG).decode()
TEXT = "A long story about a town and its river, told by the people who live there."

# (task as the request names it, inputs, parameters, the SDK's call: (args, kwargs) when it differs).
CASES = [
    ("sentiment-analysis", "I love this", {}, None),
    ("text-classification", ["I love this", "awful"], {"top_k": 2}, None),
    ("text-classification", "meh", {"top_k": None, "function_to_apply": "sigmoid"}, None),
    ("text-classification", {"text": "I love this", "text_pair": "really"}, {}, None),
    ("text-classification", ["a", {"text": "b", "text_pair": "c"}], {"top_k": 0}, None),
    ("ner", "John lives in Paris", {"aggregation_strategy": "simple"}, None),
    ("token-classification", ["John lives in Paris", "hi"], {}, None),
    ("question-answering", {"question": "Where does John live?", "context": "John lives in Paris."}, {}, None),
    ("question-answering", [{"question": "Who?", "context": "John lives in Paris."},
                            {"question": "Where?", "context": "Mary is in Rome."}], {"top_k": 2}, None),
    ("fill-mask", "Paris is the [MASK] of France.", {"top_k": 3}, None),
    ("fill-mask", ["The [MASK] sat on the [MASK].", "A [MASK]."], {}, None),
    ("zero-shot-classification", "I like football", {"candidate_labels": ["sports", "politics"]}, None),
    ("zero-shot-classification", ["I like football", "taxes rise"],
     {"candidate_labels": "sports, politics", "multi_label": True}, None),
    ("feature-extraction", "hello world", {}, None),
    ("feature-extraction", ["hello world", "a longer sentence"], {"pooling": "mean", "normalize": True}, None),
    ("image-classification", PNG_B64, {"top_k": 2}, ((PNG,), {"top_k": 2})),
    ("image-classification", [f"data:image/png;base64,{PNG_B64}"], {}, (([PNG],), {})),
    ("text-generation", "Once upon a time", {"max_new_tokens": 5, "do_sample": False}, None),
    ("text-generation", ["Hello", "Once"], {"max_new_tokens": 3, "do_sample": False, "return_full_text": False}, None),
    ("summarization", TEXT, {"max_new_tokens": 6}, None),
    ("summarization", [TEXT, "A short one."], {"max_new_tokens": 6, "num_beams": 2, "num_return_sequences": 2}, None),
    ("translation", "The house is small.", {"max_new_tokens": 6}, None),
    ("translation_en_to_fr", ["The house is small.", "Hello"], {"max_new_tokens": 6}, None),
]


@pytest.fixture(scope="module")
def http_url(server) -> str:
    return server.http_url


def post(http_url: str, task: str, body: object, **kwargs) -> httpx.Response:
    return httpx.post(f"{http_url}/v1/pipelines/{task}", json=body, timeout=120, **kwargs)


def assert_close(got, expected, where: str = "") -> None:
    """Equal, floats within float32 rounding (the gRPC wire carries scores as float32)."""
    if isinstance(expected, float):
        assert isinstance(got, (int, float)) and math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-7), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


@pytest.mark.parametrize("task, inputs, parameters, sdk_call", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_task_answers_as_the_sdk_does(http_url, target, task, inputs, parameters, sdk_call):
    answer = post(http_url, task, {"inputs": inputs, "parameters": parameters})
    assert answer.status_code == 200, answer.text
    assert answer.headers["pipeserve-model"] and answer.headers["pipeserve-model-version"] == "1"
    args, kwargs = sdk_call or ((inputs,), parameters)
    with pipeline(task, target=target) as remote:
        expected = remote(*args, **kwargs)
    assert_close(answer.json(), expected, task)


def test_the_model_is_named_in_the_query_or_the_body(http_url):
    by_query = post(http_url, "text-classification?model=tiny-classifier", {"inputs": "hi"})
    by_body = post(http_url, "text-classification", {"inputs": "hi", "model": "tiny-classifier", "model_version": 1})
    assert by_query.json() == by_body.json() and by_body.headers["pipeserve-model"] == "tiny-classifier"
    assert post(http_url, "text-classification", {"inputs": "hi"}).headers["pipeserve-model"] == "sentiment"


@pytest.mark.parametrize("task, body, status, says", [
    ("text-classification", {"inputs": "x", "parameters": {"topk": 2}}, 400, "parameters.topk"),
    ("text-classification", {"inputs": "x", "options": {}}, 400, "options: is not a field"),
    ("text-classification", {"parameters": {}}, 400, "inputs: is required"),
    ("text-classification", {"inputs": [1]}, 400, "inputs[0]"),
    ("text-classification", {"inputs": "x", "model": "minilm"}, 400, "serves 'feature-extraction'"),
    ("text-classification", {"inputs": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ("text-classification", {"inputs": "x", "model_version": "one"}, 400, "model_version"),
    ("question-answering", {"inputs": {"question": "q"}}, 400, "needs a question and a context"),
    ("image-classification", {"inputs": "not base64!"}, 400, "is not base64"),
    ("image-classification", {"inputs": base64.b64encode(b"not an image").decode()}, 400, "inputs[0]"),
    ("zero-shot-classification", {"inputs": "x"}, 400, "candidate_labels"),
    ("no-such-task", {"inputs": "x"}, 404, "no task 'no-such-task'"),
])
def test_bad_pipeline_requests_get_4xx_naming_the_fix(http_url, task, body, status, says):
    answer = post(http_url, task, body)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]


def test_model_named_twice_differently_is_refused(http_url):
    answer = post(http_url, "text-classification?model=sentiment", {"inputs": "x", "model": "tiny-classifier"})
    assert answer.status_code == 400 and "name it once" in answer.json()["error"]


def test_the_tasks_served_are_listed_with_their_models(http_url):
    listed = {t["task"]: t for t in httpx.get(f"{http_url}/v1/pipelines").json()["tasks"]}
    assert "sentiment-analysis" in listed["text-classification"]["aliases"]
    assert {"sentiment", "tiny-classifier"} <= set(listed["text-classification"]["models"])
    assert "gpt2" in listed["text-generation"]["models"]
