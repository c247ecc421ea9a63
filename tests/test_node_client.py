"""The Node.js client (clients/node) against the real server: its own `node --test` suite.

The Python SDK's results for a set of calls go to the Node tests as the expected values, so the
two clients must agree on every task's result shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from pipeserve.client import pipeline
from tests.conftest import ROOT

NODE_CLIENT = ROOT / "clients" / "node"

# (task, inputs, params): each as the Node test passes it to its pipeline(); params in snake_case,
# which the Node client accepts as transformers spells them. "IMAGE" stands for a PNG file's path.
CALLS = [
    ("sentiment-analysis", "I love this", {}),
    ("sentiment-analysis", ["I like pizza", "I hate bugs"], {"top_k": 2}),
    ("text-classification", "I like pizza", {"top_k": None}),
    ("text-classification", "I like pizza", {"top_k": 1, "function_to_apply": "sigmoid"}),
    ("feature-extraction", "hello world", {}),
    ("feature-extraction", ["a", "b"], {"pooling": "mean", "normalize": True}),
    ("ner", "My name is Sarah and I live in London", {}),
    ("token-classification", ["Paris is nice", "so is Rome"], {"aggregation_strategy": "simple"}),
    ("question-answering", {"question": "Where do I live?", "context": "My name is Sarah and I live in London"}, {}),
    ("question-answering", [{"question": "Who?", "context": "Sarah lives in London"}] * 2, {"top_k": 2}),
    ("fill-mask", "The capital of France is [MASK].", {"top_k": 3}),
    ("zero-shot-classification", "I love pizza", {"candidate_labels": ["food", "sport"]}),
    ("zero-shot-classification", ["I love pizza", "goal!"], {"candidate_labels": ["food", "sport"], "multi_label": True}),
    ("image-classification", "IMAGE", {"top_k": 2}),
    ("text-generation", "Once upon a time", {"max_new_tokens": 5, "do_sample": False}),
    ("text-generation", ["Hello", "Bye"], {"max_new_tokens": 3}),
    ("summarization", "A long text about many things that happened today.", {"max_new_tokens": 6}),
    ("summarization", ["one text", "another"], {"max_new_tokens": 4, "num_beams": 2, "num_return_sequences": 2}),
    ("translation", "Hello world", {"max_new_tokens": 6}),
    ("translation_en_to_fr", ["Good morning", "Thank you"], {"max_new_tokens": 4}),
]
# Conversations on the default repository's chat model: (inputs, params), compared like CALLS.
CHAT_MODEL = "gpt2-chat"
CHAT_CALLS = [
    ([{"role": "user", "content": "Hi"}], {"max_new_tokens": 5}),
    ([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]], {"max_new_tokens": 3}),
    ([{"role": "user", "content": "Hi"}], {"max_new_tokens": 4, "return_full_text": False, "num_beams": 2}),
]
# The tasks every default repository serves: the test fails, not skips, without them.
REQUIRED_TASKS = {"text-classification", "feature-extraction"}


def served_tasks(target: str) -> set[str]:
    """Canonical task names of the models the server has ready."""
    from pipeserve.client.tasks import codec_for
    from pipeserve.v1 import model_service_pb2 as pb
    from pipeserve.v1 import model_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        models = pb_grpc.ModelServiceStub(channel).ListModels(pb.ListModelsRequest(ready_only=True), timeout=10).models
    tasks = set()
    for model in models:
        try:
            tasks.add(codec_for(model.task).task)
        except ValueError:  # a task this SDK has no codec for
            pass
    return tasks


def png_file(folder: Path) -> str:
    from PIL import Image

    path = folder / "image.png"
    Image.new("RGB", (32, 24), (200, 30, 90)).save(path)
    return str(path)


def node_available() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "clients/node/node_modules is missing: run tests/prepare.d/node.sh"
    return None


def run_node_tests(env: dict[str, str], *, pattern: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`node --test` in clients/node with `env` added; fails the calling test with node's output."""
    why = node_available()
    if why:
        pytest.skip(why)
    args = ["node", "--test", "--test-reporter=spec"]
    if pattern:
        args.append(f"--test-name-pattern={pattern}")
    args.append("test/")
    done = subprocess.run(args, cwd=NODE_CLIENT, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"node --test failed ({done.returncode}):\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    return done


def test_node_client_suite_passes_against_the_live_server(target: str, tmp_path: Path) -> None:
    from pipeserve.client.tasks import codec_for

    served = served_tasks(target)
    assert REQUIRED_TASKS <= served
    # Every task the server serves is compared here, so a new task needs its Node codec and a call.
    assert served <= {codec_for(task).task for task, _, _ in CALLS}, served
    image = png_file(tmp_path)
    expected = []
    for task, inputs, params in CALLS:
        try:
            canonical = codec_for(task).task
        except ValueError:  # no Python codec for the task (yet): nothing to compare with
            continue
        if canonical not in served:
            continue  # checked once the default repository serves the task
        inputs = image if inputs == "IMAGE" else inputs
        with pipeline(task, target=target) as remote:
            expected.append({"task": task, "inputs": inputs, "params": params, "result": remote(inputs, **params)})
    expected_file = tmp_path / "expected.json"
    expected_file.write_text(json.dumps(expected))
    chat_env = {}
    if "text-generation" in served:
        with pipeline("text-generation", model=CHAT_MODEL, target=target) as chat:
            calls = [{"inputs": inputs, "params": params, "result": chat(inputs, **params)}
                     for inputs, params in CHAT_CALLS]
        chat_file = tmp_path / "chat.json"
        chat_file.write_text(json.dumps({"model": CHAT_MODEL, "calls": calls}))
        chat_env["PIPESERVE_TEST_CHAT_EXPECTED"] = str(chat_file)

    done = run_node_tests({"PIPESERVE_TARGET": target, "PIPESERVE_TEST_EXPECTED": str(expected_file),
                           "PIPESERVE_TEST_TASKS": ",".join(sorted(served)), **chat_env})
    # The suite ran its live-server tests rather than skipping them.
    assert "# fail 0" in done.stdout or "ℹ fail 0" in done.stdout, done.stdout[-3000:]
    assert "every call gives what the Python SDK gives" in done.stdout
    assert "PIPESERVE_TARGET is not set" not in done.stdout
    if "text-generation" in served:
        assert "no text-generation model is served" not in done.stdout
        assert "stream() yields the text the unary call returns" in done.stdout
        assert "no chat model is served" not in done.stdout


def test_node_examples_run(target: str) -> None:
    """The unary example prints transformers-shaped JSON."""
    why = node_available()
    if why:
        pytest.skip(why)
    done = subprocess.run(["node", "examples/classify.mjs", "I love this"], cwd=NODE_CLIENT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PIPESERVE_TARGET": target})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result, list) and set(result[0]) == {"label", "score"}


def test_node_streaming_example_runs(target):
    """The streaming example prints the prompt, then the text as it comes, and the finish reason."""
    why = node_available()
    if why:
        pytest.skip(why)
    if "text-generation" not in served_tasks(target):
        pytest.skip("the server has no text-generation model ready")
    done = subprocess.run(["node", "examples/generate-stream.mjs", "Once upon a time"], cwd=NODE_CLIENT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PIPESERVE_TARGET": target})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Once upon a time") and len(done.stdout) > len("Once upon a time\n")
    assert done.stderr.startswith("[length, 32 tokens]") or done.stderr.startswith("[eos")
