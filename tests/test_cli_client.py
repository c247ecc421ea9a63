"""`pipeserve call`, `pipeserve generate` and `pipeserve health`, run as a shell would run them,
against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeserve.client import pipeline


def pipeserve(*args: str, target: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeserve.server.cli", *args]
    if target is not None:
        command += ["--target", target]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_call_prints_what_the_sdk_returns(target):
    done = pipeserve("call", "sentiment-analysis", "I love this", target=target)
    assert done.returncode == 0, done.stderr
    with pipeline("sentiment-analysis", target=target) as clf:
        assert json.loads(done.stdout) == clf("I love this")


def test_call_params_parse_as_json_and_several_inputs_are_a_batch(target):
    done = pipeserve("call", "text-classification", "I like pizza", "I hate bugs", "--param", "top_k=2",
                     "-p", "function_to_apply=sigmoid", target=target)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == 2 and all(len(labels) == 2 for labels in results)
    assert all(0 < s["score"] < 1 for labels in results for s in labels)
    with pipeline("text-classification", target=target) as clf:
        assert results == clf(["I like pizza", "I hate bugs"], top_k=2, function_to_apply="sigmoid")


def test_call_reads_inputs_from_stdin_and_takes_the_target_from_the_environment(target):
    done = pipeserve("call", "feature-extraction", "--param", "pooling=mean", "--param", "normalize=true",
                     stdin="first line\nsecond line\n", env={"PIPESERVE_TARGET": target})
    assert done.returncode == 0, done.stderr
    vectors = json.loads(done.stdout)
    assert len(vectors) == 2
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)


def test_call_reports_a_status_and_exits_1(target):
    done = pipeserve("call", "sentiment-analysis", "x", "--model", "no-such-model", target=target)
    assert done.returncode == 1
    assert done.stderr.startswith("error: NOT_FOUND: model 'no-such-model' is not served")
    assert done.stdout == ""


def test_call_refuses_an_unknown_task(target):
    done = pipeserve("call", "no-such-task", "x", target=target)
    assert done.returncode == 2
    assert "unknown task 'no-such-task'" in done.stderr


@pytest.mark.parametrize("service,status,code", [("readiness", "SERVING", 0), ("liveness", "SERVING", 0)])
def test_health_exits_0_when_serving(target, service, status, code):
    done = pipeserve("health", "--service", service, target=target)
    assert (done.returncode, done.stdout.strip()) == (code, status)


def test_health_of_an_unknown_service_fails(target):
    done = pipeserve("health", "--service", "no.Such", target=target)
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


@pytest.fixture(scope="module")
def generation_served(target):
    from tests.test_node_client import served_tasks

    if "text-generation" not in served_tasks(target):
        pytest.skip("the server has no text-generation model ready")


def test_generate_prints_the_text_and_streams_the_same_text(target, generation_served):
    prompt = "Once upon a time"
    with pipeline("text-generation", target=target) as gen:
        full = gen(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
        new = gen(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    done = pipeserve("generate", prompt, "--max-new-tokens", "8", "-p", "do_sample=false", target=target)
    assert done.returncode == 0, done.stderr
    assert done.stdout == full + "\n"
    streamed = pipeserve("generate", "--stream", prompt, "--max-new-tokens", "8", "-p", "do_sample=false",
                         target=target)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == new + "\n"  # greedy: the same tokens, as they came


def test_generate_stream_json_ends_with_the_finish_reason(target, generation_served):
    done = pipeserve("generate", "--stream", "--json", "Hello", "--max-new-tokens", "4", target=target)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events and events[-1]["finish_reason"] in ("length", "eos", "stop_sequence")
    assert sum(len(e["token_ids"]) for e in events) == events[-1]["usage"]["generated_tokens"]
