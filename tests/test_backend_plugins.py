"""Backends are plugins: a package that registers a Backend under the `pipeserve.backends` entry
point group is served without any change to pipeserve.

The test writes a tiny installed distribution (a module and a .dist-info with entry_points.txt)
into a temporary folder, puts it on the PYTHONPATH of a real `pipeserve serve` process, and calls
a model whose config names the plugin's backend.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import grpc
import numpy as np
import pytest

from pipeserve.backends.registry import backend_names
from pipeserve.client import pipeline
from pipeserve.v1 import model_service_pb2, model_service_pb2_grpc
from tests.conftest import REPOSITORY
from tests.model_folders import link_files
from tests.server_harness import ServerProcess

TOY_BACKEND = '''
"""A toy backend: "logits" that count tokens, so a test can predict every answer."""
import torch

from pipeserve.backends.base import Backend, Instance


class CountingInstance(Instance):
    def __init__(self, device, bias):
        self.device = device
        self.bias = bias

    def run(self, inputs):
        tokens = inputs["attention_mask"].sum(dim=1).float()
        return {"logits": torch.stack([torch.full_like(tokens, self.bias), tokens / 10], dim=1)}


class CountingBackend(Backend):
    name = "counting"

    def load(self, spec, device):
        return CountingInstance(device, float(spec.parameters.get("bias", "0")))
'''


def write_plugin(root: Path) -> Path:
    """An installed distribution `toy-backends` in `root`, as pip would leave it in site-packages."""
    (root / "toy_backends.py").write_text(textwrap.dedent(TOY_BACKEND))
    info = root / "toy_backends-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backends\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[pipeserve.backends]\ncounting = toy_backends:CountingBackend\n")
    return root


@pytest.fixture(scope="module")
def plugin_server(model_repository: Path, tmp_path_factory):
    plugin = write_plugin(tmp_path_factory.mktemp("plugin"))
    repo = tmp_path_factory.mktemp("plugin-repo")
    folder = repo / "counter"
    link_files(REPOSITORY / "sentiment", folder)  # its tokenizer and labels; the weights go unused
    (folder / "config.pbtxt").write_text(textwrap.dedent("""
        name: "counter"
        task: "text-classification"
        backend: "counting"
        instance_group { count: 2 kind: KIND_CPU }
        backend_parameters { key: "bias" value: "0.5" }
    """))
    server = ServerProcess(repo, env={"PYTHONPATH": str(plugin)}).start()
    yield server
    server.stop()


def test_the_plugin_is_not_installed_here():
    assert "counting" not in backend_names()  # only the server process sees it


def test_a_plugin_backend_serves_a_model(plugin_server: ServerProcess):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPOSITORY / "sentiment")
    texts = ["hi", "a somewhat longer sentence, with more tokens than five"]
    clf = pipeline("text-classification", "counter", target=plugin_server.target, retries=0)
    results = clf(texts, top_k=None, function_to_apply="none")
    for text, result in zip(texts, results):
        tokens = len(tokenizer(text)["input_ids"])
        scores = {r["label"]: r["score"] for r in result}
        np.testing.assert_allclose([scores["NEGATIVE"], scores["POSITIVE"]], [0.5, tokens / 10], rtol=1e-6)
    clf.close()
    with grpc.insecure_channel(plugin_server.target) as channel:
        listed = model_service_pb2_grpc.ModelServiceStub(channel).ListModels(model_service_pb2.ListModelsRequest())
    assert [(m.name, m.backend, model_service_pb2.ModelState.Name(m.state)) for m in listed.models] == \
        [("counter", "counting", "MODEL_STATE_READY")]
