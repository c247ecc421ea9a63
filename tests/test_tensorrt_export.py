"""`pipeserve export --backend tensorrt`: ONNX checked in onnxruntime against eager, a Triton
repository entry for a TensorRT plan, and the pipeserve config that points the Triton backend at it.

On CPU everything up to the plan is checked (tests/test_triton_backend.py serves the pipeserve
config this export writes against a real Triton). The whole path (trtexec builds the plan,
tritonserver serves it, pipeserve answers like eager) runs under `make test-gpu` where trtexec
and tritonserver are installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from pipeserve.backends.base import ModelSpec
from pipeserve.backends.eager import EagerBackend
from pipeserve.backends.registry import backend_names
from pipeserve.backends.triton import TritonSettings
from pipeserve.server.cli import main as cli_main
from pipeserve.server.export.source import ExportError
from pipeserve.server.export.tensorrt import export_tensorrt
from pipeserve.server.repository.config import parse_model_config, validate_model_config
from pipeserve.server.tasks.registry import task_class, task_names
from tests.model_folders import add_model

TOLERANCE = 1e-4
TEXTS = ["I love this!", "The quick brown fox jumps over the lazy dog while the others wait.", "ok"]
PAIRS = ["Who jumps?", "What is quick?", "Where?"]


@pytest.fixture(scope="module")
def repo(model_repository: Path, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("tensorrt-repo")
    add_model(repo, "sentiment", "sentiment")
    add_model(repo, "qa", "qa", task="question-answering", extra="max_sequence_length: 128")
    return repo


def _eager(repo: Path, name: str, task: str):
    cls = task_class(task)
    spec = ModelSpec(name=name, version=1, local_path=repo / name, model_class=cls.model_class,
                     input_names=cls.input_names, output_names=cls.output_names)
    return EagerBackend().load(spec, torch.device("cpu"))


def test_onnx_matches_eager_in_onnxruntime_and_triton_entry_is_valid(repo: Path, tmp_path: Path):
    import onnxruntime
    from transformers import AutoTokenizer
    from tritonclient.grpc import model_config_pb2 as triton

    triton_repo = tmp_path / "triton"
    cases = [("sentiment", "text-classification", None), ("qa", "question-answering", PAIRS)]
    if "question-answering" not in task_names():
        cases = cases[:1]
    for name, task, pairs in cases:
        result = export_tensorrt(repo, name, triton_repo, triton_url="triton.internal:8001")
        assert max(result.max_difference.values()) <= TOLERANCE
        # onnxruntime on CPU against the eager backend, on what the task's tokenizer makes.
        tokenizer = AutoTokenizer.from_pretrained(repo / name)
        batch = dict(tokenizer(pairs or TEXTS, TEXTS if pairs else None, padding=True, return_tensors="pt"))
        session = onnxruntime.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
        feeds = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, feeds)))
        want = _eager(repo, name, task).run(batch)
        assert set(task_class(task).output_names) <= set(got)
        for key in names:
            np.testing.assert_allclose(got[key], want[key].numpy(), atol=TOLERANCE, rtol=0, err_msg=f"{name}: {key}")

        # Triton's side: its own ModelConfig message parses the file; names and types match ONNX.
        config = text_format.Parse(result.triton_config_path.read_text(), triton.ModelConfig())
        assert (config.name, config.platform, config.max_batch_size) == (result.model_name, "tensorrt_plan", 32)
        assert [i.name for i in config.input] == [i.name for i in session.get_inputs()]
        assert [o.name for o in config.output] == names
        assert all(triton.DataType.Name(i.data_type) == "TYPE_INT64" and list(i.dims) == [-1] for i in config.input)
        assert all(triton.DataType.Name(o.data_type) == "TYPE_FP32" for o in config.output)
        assert result.plan_path == result.onnx_path.parent / "model.plan"
        script = result.build_script.read_text()
        assert os.access(result.build_script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(result.build_script)]).returncode == 0
        assert "--saveEngine=\"$VERSION/model.plan\"" in script
        for tensor in config.input:
            assert f"{tensor.name}:1x1" in script and f"{tensor.name}:32x" in script

        # pipeserve's side: a valid config whose Triton backend parameters match the entry.
        pipeserve = parse_model_config(result.pipeserve_config_path)
        validate_model_config(pipeserve, result.pipeserve_config_path, result.model_name, task_names(), backend_names())
        assert (pipeserve.backend, pipeserve.task, pipeserve.default_for_task) == ("triton", task, False)
        settings = TritonSettings.from_spec(ModelSpec(
            name=pipeserve.name, version=1, local_path=None, parameters=dict(pipeserve.backend_parameters),
            input_names=task_class(task).input_names, output_names=task_class(task).output_names))
        assert (settings.url, settings.model_name) == ("triton.internal:8001", result.model_name)
        assert [(b.remote, b.datatype) for b in settings.inputs] == \
            [(i.name, triton.DataType.Name(i.data_type).removeprefix("TYPE_")) for i in config.input]
        assert [(b.remote, b.datatype) for b in settings.outputs] == \
            [(o.name, triton.DataType.Name(o.data_type).removeprefix("TYPE_")) for o in config.output]
        # Requests never exceed the plan's largest shape.
        assert pipeserve.max_sequence_length == (128 if name == "qa" else 512)
        assert (result.pipeserve_config_path.parent / "tokenizer.json").is_file()


def test_each_export_adds_a_triton_version(repo: Path, tmp_path: Path, capsys):
    args = ["export", "--backend", "tensorrt", "sentiment", "--repository", str(repo),
            "--triton-repository", str(tmp_path), "--name", "s-trt"]
    assert cli_main(args) == 0
    config = (repo / "s-trt" / "config.pbtxt").read_text()
    assert cli_main(args) == 0
    assert sorted(p.name for p in (tmp_path / "s-trt").iterdir()) == \
        ["1", "2", "README.md", "build_plan.sh", "config.pbtxt"]
    assert (repo / "s-trt" / "config.pbtxt").read_text() == config  # kept: a user may have tuned it
    out = capsys.readouterr().out
    assert "platform tensorrt_plan" in out and "backend triton" in out


def test_generation_is_refused_with_the_reason(model_repository: Path, tmp_path: Path):
    if "text-generation" not in task_names():
        pytest.skip("the text-generation task is not registered yet")
    add_model(tmp_path, "gpt2", "gpt2", task="text-generation")
    with pytest.raises(ExportError, match="TensorRT-LLM"):
        export_tensorrt(tmp_path, "gpt2", tmp_path / "triton")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.gpu
def test_the_whole_path_on_a_gpu(tmp_path: Path, request):
    """trtexec builds the plan, tritonserver serves it on the GPU, pipeserve answers like eager."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    trtexec = shutil.which("trtexec") or next((p for p in ("/usr/src/tensorrt/bin/trtexec",) if Path(p).exists()), None)
    if trtexec is None or shutil.which("tritonserver") is None:
        pytest.skip("needs trtexec and tritonserver with its TensorRT backend (e.g. the NGC tritonserver image)")
    repo = request.getfixturevalue("repo")
    from pipeserve.client import pipeline
    from tests.conftest import server_settings
    from tests.server_harness import ServerThread

    port = _free_port()
    result = export_tensorrt(repo, "sentiment", tmp_path / "triton", name="sentiment-trt-gpu",
                             triton_url=f"127.0.0.1:{port}", max_sequence_length=128)
    subprocess.run(["bash", str(result.build_script)], check=True, timeout=600, env={**os.environ, "TRTEXEC": trtexec})
    assert result.plan_path.is_file()
    triton = subprocess.Popen(["tritonserver", f"--model-repository={tmp_path / 'triton'}", f"--grpc-port={port}",
                               f"--http-port={_free_port()}", f"--metrics-port={_free_port()}"])
    server = None
    try:
        server = ServerThread(server_settings(repo, load_models=["sentiment", "sentiment-trt-gpu"])).start()
        deadline = time.monotonic() + 120
        while not server.call(lambda: server.server.registry.get("sentiment-trt-gpu").ready()):
            assert time.monotonic() < deadline and triton.poll() is None, "Triton did not get the plan ready"
            time.sleep(0.2)
        eager = pipeline("text-classification", "sentiment", target=server.target)
        trt = pipeline("text-classification", "sentiment-trt-gpu", target=server.target)
        want = eager(TEXTS, top_k=None, function_to_apply="none")
        got = trt(TEXTS, top_k=None, function_to_apply="none")
        for w, g in zip(want, got):
            np.testing.assert_allclose(sorted(x["score"] for x in g), sorted(x["score"] for x in w), atol=1e-3)
    finally:
        if server is not None:
            server.stop()
        triton.terminate()
        triton.wait(30)
