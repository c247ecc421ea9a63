"""Triton's generate extension over HTTP: /generate answers once, /generate_stream sends server-sent
events that add up to the same text, and a client that leaves mid-stream stops its sequence."""

from __future__ import annotations

import json

import httpx
import pytest

from pipeserve.client import pipeline
from tests.generation_helpers import statistics, wait_until

MODEL = "gpt2"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def http_url(server) -> str:
    return server.http_url


def events(answer: httpx.Response) -> list[dict]:
    """The JSON of each `data:` event of a server-sent event stream."""
    assert answer.headers["content-type"].startswith("text/event-stream")
    return [json.loads(line[len("data: "):]) for line in answer.text.split("\n\n") if line.startswith("data: ")]


def test_generate_answers_as_the_typed_service_does(http_url, target):
    answer = httpx.post(f"{http_url}/v2/models/{MODEL}/generate", timeout=60,
                        json={"text_input": PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": False}})
    assert answer.status_code == 200, answer.text
    with pipeline("text-generation", model=MODEL, target=target) as gen:
        [expected] = gen(PROMPT, max_new_tokens=8, do_sample=False)
    assert answer.json() == {"model_name": MODEL, "model_version": "1", "text_output": expected["generated_text"]}


def test_generate_takes_top_level_parameters_and_returns_what_it_is_asked(http_url):
    answer = httpx.post(f"{http_url}/v2/models/{MODEL}/versions/1/generate", timeout=60, json={
        "text_input": PROMPT, "max_tokens": 5, "parameters": {"do_sample": False, "return_full_text": False,
                                                              "return_finish_reason": True,
                                                              "return_num_output_tokens": True}})
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["finish_reason"] == "length" and doc["num_output_tokens"] == 5 and not doc["text_output"].startswith(PROMPT)


def test_generate_stream_events_add_up_to_the_generated_text(http_url):
    request = {"text_input": PROMPT, "parameters": {"max_new_tokens": 12, "do_sample": False,
                                                   "return_full_text": False, "return_finish_reason": True}}
    whole = httpx.post(f"{http_url}/v2/models/{MODEL}/generate", json=request, timeout=60).json()
    answer = httpx.post(f"{http_url}/v2/models/{MODEL}/generate_stream", json=request, timeout=60)
    assert answer.status_code == 200, answer.text
    streamed = events(answer)
    assert len(streamed) > 1
    assert all(e["model_name"] == MODEL and e["model_version"] == "1" for e in streamed)
    assert "".join(e["text_output"] for e in streamed) == whole["text_output"]
    assert streamed[-1]["finish_reason"] == "length" and "finish_reason" not in streamed[0]


def test_a_client_that_leaves_mid_stream_stops_its_sequence(http_url, target):
    before = statistics(target, MODEL).generated_tokens
    request = {"text_input": PROMPT, "parameters": {"max_new_tokens": 400, "do_sample": False}}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{http_url}/v2/models/{MODEL}/generate_stream",
                                                           json=request) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        received = 0
        for line in lines:
            received += line.startswith("data: ")
            if received == 3:
                break
    wait_until(lambda: statistics(target, MODEL).active_sequences == 0, what="the active count returning to zero")
    assert statistics(target, MODEL).generated_tokens - before < 400


@pytest.mark.parametrize("path, body, status, says", [
    ("generate", {"parameters": {}}, 400, "text_input: is required"),
    ("generate", {"text_input": ["a", "b"]}, 400, "must be the prompt"),
    ("generate", {"text_input": "x", "bad_words": ""}, 400, "bad_words: is not a field"),
    ("generate", {"text_input": "x", "parameters": {"beams": 2}}, 400, "parameters.beams"),
    ("generate", {"text_input": "x", "parameters": {"max_new_tokens": -1}}, 400, "max_new_tokens"),
    ("generate_stream", {"text_input": "x", "parameters": {"num_return_sequences": 2, "do_sample": True}}, 400,
     "num_return_sequences"),
    ("generate_stream", {"text_input": "x", "parameters": {"temperature": "hot"}}, 400, "temperature"),
])
def test_bad_generate_requests_get_4xx_before_any_event(http_url, path, body, status, says):
    answer = httpx.post(f"{http_url}/v2/models/{MODEL}/{path}", json=body, timeout=60)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]


def test_generate_serves_text_generation_models_only(http_url):
    answer = httpx.post(f"{http_url}/v2/models/sentiment/generate", json={"text_input": "x"})
    assert answer.status_code == 400 and "/v1/pipelines/text-classification" in answer.json()["error"]
    assert httpx.post(f"{http_url}/v2/models/no-such-model/generate", json={"text_input": "x"}).status_code == 404
