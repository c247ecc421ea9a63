"""What a request and a model folder can make the server read or run.

- Model names and paths cannot leave the repository: over the wire (ModelService, KServe
  repository and inference calls) and in config.pbtxt (`source.path`, symlinked folders).
- Local weights load from safetensors only: a folder whose weights are a pickle is refused with a
  clear error, and a booby-trapped pickle is never opened.
- A model folder's own Python code runs only where its config.pbtxt says `trust_remote_code: true`.

TLS, mTLS and the bearer token are tested in tests/test_security.py; message-size limits in
tests/test_bad_input.py. SECURITY.md says what the server promises.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import grpc
import pytest
import torch
import tritonclient.grpc as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tritonclient.utils import InferenceServerException

from pipeserve.server.repository.config import is_valid_model_name
from pipeserve.v1 import model_service_pb2 as ms_pb
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_classification_pb2 as tc_pb
from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
from tests.conftest import REPOSITORY, server_settings
from tests.model_folders import add_model, link_files
from tests.server_harness import ServerThread

SOURCE = REPOSITORY / "tiny-classifier"
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def _model_folder(repo: Path, name: str, pbtxt_extra: str = "", weights: bool = True) -> Path:
    """A real copy (not links) of the tiny classifier's config and tokenizer, and its weights if asked."""
    folder = repo / name
    folder.mkdir()
    for file in TOKENIZER_FILES:
        shutil.copy(SOURCE / file, folder / file)
    if weights:
        shutil.copy(SOURCE / "model.safetensors", folder / "model.safetensors")
    (folder / "config.pbtxt").write_text(f'name: "{name}"\ntask: "text-classification"\nbackend: "eager"\n{pbtxt_extra}\n')
    return folder


class _OpensAFileWhenUnpickled:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _custom_code(folder: Path, marker: Path) -> None:
    """Turns a model folder into one that needs its own code (auto_map), which touches `marker`."""
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "pipeserve-custom-bert"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForSequenceClassification": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n    model_type = 'pipeserve-custom-bert'\n")
    (folder / "modeling_custom.py").write_text(
        "from transformers import BertForSequenceClassification\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomModel(BertForSequenceClassification):\n    config_class = CustomConfig\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory, model_repository):
    """A repository with one good model and every kind of folder that must not load, plus the
    marker files that would appear if something ran that must not run."""
    root = tmp_path_factory.mktemp("security")
    repo = root / "repo"
    repo.mkdir()
    outside = root / "outside"
    link_files(SOURCE, outside)
    (outside / "config.pbtxt").write_text('name: "linked-out"\ntask: "text-classification"\n')
    markers = {name: root / f"{name}.ran" for name in ("pickle", "untrusted", "trusted")}

    add_model(repo, "inside")
    # Weights only as a pickle: a plain state dict (what transformers would happily load), and a
    # booby-trapped one.
    torch.save(load_file(SOURCE / "model.safetensors"), _model_folder(repo, "pickled", weights=False) / "pytorch_model.bin")
    torch.save(_OpensAFileWhenUnpickled(markers["pickle"]), _model_folder(repo, "booby-trapped", weights=False) / "pytorch_model.bin")
    # Custom code, without and with trust_remote_code.
    _custom_code(_model_folder(repo, "custom-code"), markers["untrusted"])
    _custom_code(_model_folder(repo, "trusted-code", "trust_remote_code: true"), markers["trusted"])
    # Paths that leave the repository: a relative source.path, a symlinked source folder, and a
    # model folder that is itself a symlink to a folder outside.
    _model_folder(repo, "escape", 'source { path: "../../outside" }', weights=False)
    escape_link = _model_folder(repo, "escape-link", 'source { path: "weights" }', weights=False)
    (escape_link / "weights").symlink_to(outside, target_is_directory=True)
    (repo / "linked-out").symlink_to(outside, target_is_directory=True)
    return {"root": root, "repo": repo, "outside": outside, "markers": markers}


@pytest.fixture(scope="module")
def guarded(files, tmp_path_factory):
    """A server on that repository, with only the good model loaded at start."""
    # trust_remote_code copies a model's code into transformers' module cache and imports it from
    # there: keep that cache (and the sys.path entry transformers adds for it) inside the test.
    import transformers.dynamic_module_utils as dynamic

    saved_cache, saved_path = dynamic.HF_MODULES_CACHE, list(sys.path)
    dynamic.HF_MODULES_CACHE = str(tmp_path_factory.mktemp("hf-modules"))
    running = ServerThread(server_settings(files["repo"], load_models=["inside"])).start()
    yield running
    running.stop()
    dynamic.HF_MODULES_CACHE = saved_cache
    sys.path[:] = saved_path


@pytest.fixture(scope="module")
def models(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        yield ms_grpc.ModelServiceStub(channel)


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _load_error(models, name: str) -> grpc.RpcError:
    return _error(lambda: models.LoadModel(ms_pb.LoadModelRequest(name=name), timeout=120))


# -- names over the wire ---------------------------------------------------------------------------------

ESCAPING_NAMES = ["../inside", "..", ".", "inside/../inside", "./inside", "/etc", "/etc/passwd", "a/b", "a\\b",
                  "inside/", "%2e%2e", "", "inside\x00", "linked-out"]


def expected_refusal(name: str) -> grpc.StatusCode:
    """A name that is not a valid model name is the caller's mistake (INVALID_ARGUMENT); a valid
    one that the repository does not hold is NOT_FOUND."""
    return grpc.StatusCode.NOT_FOUND if is_valid_model_name(name) else grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ESCAPING_NAMES)
def test_model_service_refuses_names_that_leave_the_repository(models, files, name):
    for call in (lambda: models.LoadModel(ms_pb.LoadModelRequest(name=name), timeout=30),
                 lambda: models.GetModel(ms_pb.GetModelRequest(name=name), timeout=30)):
        error = _error(call)
        assert error.code() == expected_refusal(name), error.details()
        assert "not a valid model name" in error.details() or "not in the repository" in error.details()


def test_absolute_path_to_a_model_folder_is_not_a_name(models, files):
    error = _load_error(models, str(files["outside"]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid model name" in error.details()


def test_kserve_repository_calls_refuse_names_that_leave_the_repository(guarded, files):
    with triton.InferenceServerClient(guarded.target) as client:
        for name in ("../inside", "/etc", "linked-out", str(files["outside"])):
            with pytest.raises(InferenceServerException) as info:
                client.load_model(name)
            assert info.value.status() == f"StatusCode.{expected_refusal(name).name}", info.value.message()
            assert not client.is_model_ready(name)
        # A load request cannot carry its own config or files.
        with pytest.raises(InferenceServerException) as info:
            client.load_model("inside", config='{"backend": "python"}')
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and "not supported" in info.value.message()


@pytest.mark.parametrize("name", ["../inside", "/inside", "inside/", "linked-out"])
def test_inference_names_are_looked_up_not_opened(guarded, name):
    with grpc.insecure_channel(guarded.target) as channel:
        stub = tc_grpc.TextClassificationServiceStub(channel)
        error = _error(lambda: stub.Classify(tc_pb.ClassifyRequest(model=name, inputs=["x"]), timeout=30))
        assert error.code() == expected_refusal(name), error.details()
        assert stub.Classify(tc_pb.ClassifyRequest(model="inside", inputs=["x"]), timeout=30).model == "inside"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(alphabet="./\\%~-_a0\x00é", max_size=12))
def test_any_name_that_is_not_a_model_folder_is_not_found(models, name):
    if name == "inside":
        return
    error = _error(lambda: models.LoadModel(ms_pb.LoadModelRequest(name=name), timeout=30))
    assert error.code() == expected_refusal(name), (name, error.details())


# -- paths in config.pbtxt ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["escape", "escape-link"])
def test_config_source_path_cannot_leave_the_repository(models, name):
    error = _load_error(models, name)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "source.path: " in error.details() and "stay inside the repository" in error.details()
    assert f"{name}/config.pbtxt" in error.details()


# -- weights: safetensors only -------------------------------------------------------------------------------


def test_weights_only_as_a_pickle_are_refused_with_a_clear_error(models):
    error = _load_error(models, "pickled")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()  # failed to load: final
    assert "pytorch_model.bin" in error.details() and "safetensors only" in error.details()
    state = models.GetModel(ms_pb.GetModelRequest(name="pickled"), timeout=30).versions
    assert [v.state for v in state] == [ms_pb.MODEL_STATE_FAILED]


def test_a_booby_trapped_pickle_is_never_opened(models, files):
    error = _load_error(models, "booby-trapped")
    assert "safetensors only" in error.details()
    assert not files["markers"]["pickle"].exists(), "the server unpickled a file from the repository"


# -- custom code: only with trust_remote_code ---------------------------------------------------------------


def test_custom_code_is_refused_without_trust_remote_code(models, files):
    error = _load_error(models, "custom-code")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()  # failed to load: final
    assert "trust_remote_code" in error.details()
    assert not files["markers"]["untrusted"].exists(), "the model folder's code ran without trust_remote_code"


def test_custom_code_runs_where_the_config_trusts_it(models, guarded, files):
    assert not files["markers"]["trusted"].exists()
    versions = models.LoadModel(ms_pb.LoadModelRequest(name="trusted-code"), timeout=120).versions
    assert [v.state for v in versions] == [ms_pb.MODEL_STATE_READY]
    assert files["markers"]["trusted"].exists()
    with grpc.insecure_channel(guarded.target) as channel:
        reply = tc_grpc.TextClassificationServiceStub(channel).Classify(
            tc_pb.ClassifyRequest(model="trusted-code", inputs=["hello"]), timeout=30)
    assert {label.label for label in reply.results[0].labels} <= {"NEGATIVE", "POSITIVE"}


def test_refused_folders_leave_the_server_serving(guarded):
    with grpc.insecure_channel(guarded.target) as channel:
        reply = tc_grpc.TextClassificationServiceStub(channel).Classify(
            tc_pb.ClassifyRequest(model="inside", inputs=["still here"]), timeout=30)
    assert len(reply.results) == 1
