"""Per-device placement for every backend: eager and TorchScript instances on cuda:N, remote
backends on cpu. The CUDA tests are marked gpu (`make test-gpu`); the CPU suite skips them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeserve.backends.base import ModelSpec
from pipeserve.backends.eager import EagerBackend
from pipeserve.backends.torchscript import TorchScriptBackend, retarget_device_constants
from pipeserve.backends.triton import TritonBackend
from pipeserve.server.export.torchscript import export_torchscript
from pipeserve.server.tasks.registry import task_class
from tests.model_folders import add_model

TASK = "text-classification"


@pytest.fixture(scope="module")
def exported(model_repository: Path, tmp_path_factory) -> tuple[Path, Path]:
    """(eager model folder, TorchScript version folder) of the default `sentiment` model."""
    repo = tmp_path_factory.mktemp("devices-repo")
    add_model(repo, "sentiment", "sentiment")
    return repo / "sentiment", export_torchscript(repo, "sentiment").folder


def _spec(folder: Path) -> ModelSpec:
    cls = task_class(TASK)
    return ModelSpec(name="m", version=1, local_path=folder, model_class=cls.model_class,
                     input_names=cls.input_names, output_names=cls.output_names)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}


def test_local_backends_keep_the_devices_asked_remote_ones_use_cpu():
    asked = [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")]
    assert EagerBackend().devices(asked) == asked
    assert TorchScriptBackend().devices(asked) == asked
    assert TritonBackend().devices(asked) == [torch.device("cpu")] * 3


def test_a_cpu_export_is_pointed_at_the_instance_device(exported):
    """Tracing records `x.device` as a constant; loading for cuda:N rewrites those constants
    (checked here on the graph; run on a GPU by the gpu tests below)."""
    _, folder = exported
    instance = TorchScriptBackend().load(_spec(folder), torch.device("cpu"))
    assert retarget_device_constants(instance.module, torch.device("cpu")) == 0  # already there
    changed = retarget_device_constants(instance.module, torch.device("cuda", 1))
    assert changed > 0
    graphs = "".join(str(m.forward.graph) for m in instance.module.modules() if hasattr(m, "forward"))
    assert 'value="cuda:1"' in graphs and 'Device = prim::Constant[value="cpu"]' not in graphs
    assert retarget_device_constants(instance.module, torch.device("cpu")) == changed
    eager = EagerBackend().load(_spec(exported[0]), torch.device("cpu"))
    torch.testing.assert_close(instance.run(_batch()), eager.run(_batch()), atol=1e-4, rtol=0)


@pytest.fixture
def gpus() -> list[torch.device]:
    """Every visible GPU (requested before `exported`, so that a CPU machine skips at once)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_instances_on_every_gpu_answer_like_cpu(gpus, exported, backend: str):
    eager_folder, script_folder = exported
    want = EagerBackend().load(_spec(eager_folder), torch.device("cpu")).run(_batch())
    make = EagerBackend() if backend == "eager" else TorchScriptBackend()
    folder = eager_folder if backend == "eager" else script_folder
    for device in gpus:
        instance = make.load(_spec(folder), device)
        assert instance.device == device
        got = instance.run(_batch())
        assert all(t.device.type == "cpu" for t in got.values())  # outputs come back to the CPU
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0, msg=f"{backend} on {device}")
        instance.close()


@pytest.mark.gpu
def test_the_server_places_one_instance_per_gpu(gpus, exported):
    from pipeserve.client import pipeline
    from tests.conftest import server_settings
    from tests.server_harness import ServerThread

    repo = exported[1].parent.parent
    config = repo / "sentiment-torchscript" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text + f"\ninstance_group {{ kind: KIND_GPU gpus: {[g.index for g in gpus]} }}\n")
    server = ServerThread(server_settings(repo)).start()
    try:
        devices = server.call(lambda: [i.device for i in server.server.registry.get("sentiment-torchscript").pool.instances])
        assert devices == gpus
        clf = pipeline("text-classification", "sentiment-torchscript", target=server.target)
        ref = pipeline("text-classification", "sentiment", target=server.target)
        texts = [f"text number {i}" for i in range(64)]
        for got, want in zip(clf(texts, top_k=None, function_to_apply="none"),
                             ref(texts, top_k=None, function_to_apply="none")):
            by_label = {x["label"]: x["score"] for x in want}
            for x in got:
                assert abs(x["score"] - by_label[x["label"]]) < 1e-3, (got, want)
    finally:
        server.stop()
        config.write_text(text)
