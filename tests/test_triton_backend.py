"""The Triton backend against a real tritonserver (nvidia-pytriton, tests/triton_server/).

Triton serves the default repository's `sentiment` weights under the name the TensorRT export
gives them, so the pipeserve config that `pipeserve export --backend tensorrt` writes is served
as it is (on a GPU machine the same names would reach a TensorRT plan; here Triton runs the model
through its Python backend). A second model with hand-written backend_parameters calls the same
remote model. Both must answer like the eager model; with Triton down their requests fail with
UNAVAILABLE while the rest of the server stays healthy, and they recover when Triton is back.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.backends.base import ModelSpec
from pipeserve.backends.triton import CLIENTS, TritonBackend
from pipeserve.client import pipeline
from pipeserve.server.export.tensorrt import export_tensorrt
from tests.conftest import REPOSITORY, server_settings
from tests.model_folders import add_model, link_files
from tests.server_harness import ServerThread
from tests.triton_server.harness import TritonProcess, ensure_venv, triton_available

pytestmark = [pytest.mark.triton, pytest.mark.slow]

REMOTE = "sentiment-tensorrt"  # the model name in Triton: what the TensorRT export points at
TOLERANCE = 1e-4
SENTENCES = ["I love this!", "The quick brown fox jumps over the lazy dog while the others wait.", "ok", "no"]


@pytest.fixture(scope="module")
def triton(model_repository: Path):
    ok, reason = triton_available()
    if not ok:
        pytest.skip(reason)
    ensure_venv()
    process = TritonProcess((model_repository / "sentiment").resolve(), REMOTE, "sequence-classification",
                            extra_args=["--input", "token_type_ids"])
    process.start()
    yield process
    process.kill()  # no need for a graceful stop at the end (it takes seconds)
    process.close()


@pytest.fixture(scope="module")
def served(triton: TritonProcess, tmp_path_factory):
    """pipeserve with the eager model, the TensorRT export's config, and a hand-written one."""
    repo = tmp_path_factory.mktemp("triton-repo")
    add_model(repo, "sentiment", "sentiment")
    add_model(repo, "minilm", "minilm", task="feature-extraction")
    export_tensorrt(repo, "sentiment", tmp_path_factory.mktemp("triton-models"), triton_url=triton.grpc_url)
    folder = repo / "sentiment-triton"
    link_files(REPOSITORY / "sentiment", folder)
    (folder / "config.pbtxt").write_text(f"""
        name: "sentiment-triton"
        task: "text-classification"
        backend: "triton"
        instance_group {{ count: 2 kind: KIND_CPU }}
        backend_parameters {{ key: "url" value: "{triton.grpc_url}" }}
        backend_parameters {{ key: "model_name" value: "{REMOTE}" }}
        backend_parameters {{ key: "inputs" value: "input_ids:INT64, attention_mask, token_type_ids=token_type_ids:INT64" }}
        backend_parameters {{ key: "outputs" value: "logits:FP32" }}
        backend_parameters {{ key: "retries" value: "2" }}
        backend_parameters {{ key: "retry_backoff_s" value: "0.02" }}
        backend_parameters {{ key: "ready_cache_s" value: "0.2" }}
        backend_parameters {{ key: "timeout_s" value: "20" }}
    """)
    server = ServerThread(server_settings(repo)).start()
    yield server
    server.stop()


def _scores(target: str, model: str, texts=SENTENCES) -> list[list[float]]:
    clf = pipeline("text-classification", model, target=target, retries=0, timeout=30)
    try:
        # Raw logits (no softmax): a random tiny model's probabilities all sit near 0.5.
        results = clf(list(texts), top_k=None, function_to_apply="none")
        return [[x["score"] for x in sorted(r, key=lambda x: x["label"])] for r in results]
    finally:
        clf.close()


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def _wait_ready(served: ServerThread, name: str, want: bool, timeout: float = 60) -> None:
    """Waits for the model's readiness (which follows the remote model) to become `want`."""
    deadline = time.monotonic() + timeout
    while served.call(lambda: served.server.registry.get(name).ready()) != want:
        assert time.monotonic() < deadline, f"{name} ready() did not become {want} in {timeout}s"
        time.sleep(0.05)


def test_answers_like_eager(served: ServerThread):
    eager = _scores(served.target, "sentiment")
    for model in ("sentiment-tensorrt", "sentiment-triton"):
        np.testing.assert_allclose(_scores(served.target, model), eager, atol=TOLERANCE, err_msg=model)
    # A batch larger than one call: the batcher merges, Triton's batcher splits and merges again.
    many = [f"sentence number {i} " * (i % 5 + 1) for i in range(40)]
    np.testing.assert_allclose(_scores(served.target, "sentiment-triton", many), _scores(served.target, "sentiment", many),
                               atol=TOLERANCE)


def test_instances_share_one_channel(served: ServerThread, triton: TritonProcess):
    def clients():
        registry = served.server.registry
        return [inst.backend_instance.client for name in ("sentiment-triton", "sentiment-tensorrt")
                for inst in registry.get(name).pool.instances]

    found = served.call(clients)
    assert len(found) == 4  # two instances each
    assert all(c is found[0] for c in found)


def test_triton_down_fails_only_its_requests_then_recovers(served: ServerThread, triton: TritonProcess):
    eager = _scores(served.target, "sentiment")
    np.testing.assert_allclose(_scores(served.target, "sentiment-triton"), eager, atol=TOLERANCE)
    triton.kill()  # a crash: no goodbye to the clients
    try:
        for _ in range(3):  # the first may find the connection gone, later ones a model not ready
            with pytest.raises(grpc.RpcError) as failure:
                _scores(served.target, "sentiment-triton")
            assert failure.value.code() == grpc.StatusCode.UNAVAILABLE, failure.value.details()
            assert "Triton" in failure.value.details() or "no ready instance" in failure.value.details()
        _wait_ready(served, "sentiment-triton", False)
        with pytest.raises(grpc.RpcError) as failure:
            _scores(served.target, "sentiment-tensorrt")
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        # The rest of the server is untouched.
        assert _scores(served.target, "sentiment") == eager
        emb = pipeline("feature-extraction", "minilm", target=served.target, retries=0)
        assert len(emb("still here", pooling="mean")) == 384
        emb.close()
        assert _health(served.target) == health_pb2.HealthCheckResponse.SERVING
        assert _health(served.target, "readiness") == health_pb2.HealthCheckResponse.SERVING
    finally:
        triton.start()  # the same ports: the pooled channel reconnects
    _wait_ready(served, "sentiment-triton", True)
    _wait_ready(served, "sentiment-tensorrt", True)
    np.testing.assert_allclose(_scores(served.target, "sentiment-triton"), eager, atol=TOLERANCE)
    np.testing.assert_allclose(_scores(served.target, "sentiment-tensorrt"), eager, atol=TOLERANCE)


def _spec(url: str, **parameters: str) -> ModelSpec:
    return ModelSpec(name="m", version=1, local_path=None, input_names=("input_ids", "attention_mask"),
                     output_names=("logits",), parameters={"url": url, **parameters})


def test_config_errors_name_the_parameter(triton: TritonProcess):
    backend = TritonBackend()
    cpu = torch.device("cpu")
    cases = [
        (_spec(""), "backend_parameters.url"),
        (_spec(triton.grpc_url, model_name=REMOTE, timeout="3"), "['timeout'] unknown to backend triton"),
        (_spec(triton.grpc_url, model_name=REMOTE, inputs="input_ids:INT65"), "datatype 'INT65'"),
        (_spec(triton.grpc_url, model_name=REMOTE, retries="many"), "backend_parameters.retries"),
        (_spec(triton.grpc_url, model_name=REMOTE, outputs="scores"), "the task reads ['logits']"),
        # Checked against the remote model's metadata: names and datatypes.
        (_spec(triton.grpc_url, model_name=REMOTE, inputs="input_ids,mask"), "has no input 'mask'"),
        (_spec(triton.grpc_url, model_name=REMOTE, outputs="logits:FP16"), "'logits' is FP32 on Triton, not FP16"),
    ]
    pooled = CLIENTS.size()
    for spec, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            backend.load(spec, cpu)
    assert CLIENTS.size() == pooled  # a failed load gives its channel back
    # Remote backends place every instance on cpu, whatever devices the config asks for.
    assert backend.devices([torch.device("cuda", 0), torch.device("cuda", 1)]) == [cpu, cpu]
