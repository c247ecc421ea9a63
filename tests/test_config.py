"""config.pbtxt parsing and validation: every error names the file, the field and what is allowed."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeserve.backends.registry import backend_names
from pipeserve.server.errors import ConfigError, InvalidArgument
from pipeserve.server.repository.config import parse_model_config, validate_model_config
from pipeserve.server.repository.model_settings import VersionPolicy
from pipeserve.server.repository.repository import ModelRepository
from pipeserve.server.tasks.registry import task_names


def write(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.pbtxt"
    path.write_text(text)
    return path


def check(path: Path) -> None:
    validate_model_config(parse_model_config(path), path, path.parent.name, task_names(), backend_names())


@pytest.mark.parametrize(
    ("text", "field", "allowed"),
    [
        ('task: "sentiment"', "task", "text-classification"),
        ("", "task", "is required"),
        ('task: "text-classification" backend: "onnx"', "backend", "eager"),
        ('name: "other" task: "text-classification"', "name", "folder name"),
        ('task: "text-classification" max_batch_size: -1', "max_batch_size", ">= 0"),
        ('task: "text-classification" dynamic_batching { preferred_batch_size: 64 }', "preferred_batch_size", "1..max_batch_size"),
        ('task: "text-classification" instance_group { kind: KIND_CPU gpus: 0 }', "instance_group[0].gpus", "KIND_GPU"),
        ('task: "text-classification" source { path: "../elsewhere" }', "source.path", "'..'"),
        ('task: "text-generation" generation { refill_wait_microseconds: -1 }', "generation.refill_wait_microseconds",
         ">= 0"),
        ('task: "text-classification" unknown_field: 1', "(syntax)", "pipeserve.v1.ModelConfig"),
    ],
)
def test_config_errors_name_file_field_and_what_is_allowed(tmp_path, text, field, allowed):
    path = write(tmp_path, "m", text)
    with pytest.raises(ConfigError) as info:
        check(path)
    message = str(info.value)
    assert str(path) in message and field in message and allowed in message, message


def test_valid_config_gets_defaults(tmp_path):
    path = write(tmp_path, "m", 'task: "sentiment-analysis"')
    config = validate_model_config(parse_model_config(path), path, "m", task_names(), backend_names())
    assert config.name == "m" and config.backend == "eager" and config.max_batch_size == 32


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "", "x" * 200])
def test_model_names_cannot_leave_the_repository(tmp_path, name):
    with pytest.raises(InvalidArgument, match="not a valid model name"):
        ModelRepository(tmp_path).model_folder(name)


def test_versions_follow_the_policy(tmp_path):
    path = write(tmp_path, "m", 'task: "text-classification" version_policy { latest { num_versions: 2 } }')
    for v in (1, 2, 3):
        (tmp_path / "m" / str(v)).mkdir()
    repo = ModelRepository(tmp_path)
    config, _ = repo.read_settings("m", task_names(), backend_names())
    assert [s.version for s in repo.version_sources("m", config, path)] == [2, 3]
    config = replace(config, version_policy=VersionPolicy("specific", versions=(1, 3)))
    assert [s.version for s in repo.version_sources("m", config, path)] == [1, 3]
    config = replace(config, version_policy=VersionPolicy("specific", versions=(9,)))
    with pytest.raises(ConfigError, match="version_policy.specific.versions"):
        repo.version_sources("m", config, path)


def test_unversioned_model_is_version_one(tmp_path):
    path = write(tmp_path, "m", 'task: "text-classification"')
    repo = ModelRepository(tmp_path)
    sources = repo.version_sources("m", repo.read_settings("m", task_names(), backend_names())[0], path)
    assert [(s.version, s.local_path) for s in sources] == [(1, (tmp_path / "m").resolve())]


def test_refill_wait_is_10_ms_unless_set_and_0_turns_it_off(tmp_path):
    def wait(text: str) -> float:
        path = write(tmp_path, "m", f'task: "text-generation" generation {{ {text} }}')
        return validate_model_config(parse_model_config(path), path, "m", task_names(), backend_names()
                                     ).generation.refill_wait

    assert wait("") == 0.01
    assert (wait("refill_wait_microseconds: 0"), wait("refill_wait_microseconds: 2500")) == (0.0, 0.0025)
