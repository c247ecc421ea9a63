"""config.pbtxt, the one place its protobuf is read and written.

A config is parsed and validated once, into a frozen `ModelSettings` with every default filled in
(model_settings.py); everything past the repository works from that. Errors name the file, the
field and what is allowed. The wire adapters that show a config to clients turn settings back into
the message (`settings_to_proto`); the default-repository builder and the exporters write configs
with `write_model_config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format

from pipeserve.server.errors import ConfigError
from pipeserve.server.repository.model_settings import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_SIZE,
    BatchingSettings,
    GenerationSettings,
    InstanceGroupSettings,
    ModelSettings,
    SourceSettings,
    VersionPolicy,
    frozen_mapping,
)
from pipeserve.v1.model_config_pb2 import InstanceGroup, ModelConfig, Truncation

CONFIG_FILE = "config.pbtxt"

# Model names become folder names and metric labels: keep them to a safe, portable alphabet.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

_KINDS = {InstanceGroup.KIND_UNSPECIFIED: "auto", InstanceGroup.KIND_CPU: "cpu", InstanceGroup.KIND_GPU: "gpu"}
_TRUNCATIONS = {Truncation.TRUNCATION_UNSPECIFIED: "right", Truncation.TRUNCATION_RIGHT: "right",
                Truncation.TRUNCATION_REJECT: "reject"}


def is_valid_model_name(name: str) -> bool:
    """True for names that cannot escape the repository (no separators, no '..')."""
    return bool(MODEL_NAME.match(name)) and ".." not in name


def parse_model_config(path: Path) -> ModelConfig:
    """Parses a config.pbtxt; a syntax error names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "(file)", f"cannot be read: {exc}") from exc
    config = ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(path, "(syntax)", f"{exc}; fields are those of pipeserve.v1.ModelConfig") from exc
    return config


def read_model_settings(path: Path, folder_name: str, known_tasks: set[str], known_backends: set[str]) -> ModelSettings:
    """Parses and validates a model's config.pbtxt: the repository boundary."""
    return validate_model_config(parse_model_config(path), path, folder_name, known_tasks, known_backends)


def validate_model_config(
    config: ModelConfig,
    path: Path,
    folder_name: str,
    known_tasks: set[str],
    known_backends: set[str],
) -> ModelSettings:
    """Checks a parsed config and fills its defaults; every error names the file and field (and
    carries the task and backend the file names, for the model's status)."""
    try:
        _check(config, path, folder_name, known_tasks, known_backends)
    except ConfigError as exc:
        exc.task, exc.backend = config.task, config.backend or "eager"
        raise
    return _settings(config, folder_name, path)


def _check(config: ModelConfig, path: Path, folder_name: str, known_tasks: set[str], known_backends: set[str]) -> None:
    name = config.name or folder_name
    if name != folder_name:
        raise ConfigError(path, "name", f"is {config.name!r} but must equal the folder name {folder_name!r}")
    if not is_valid_model_name(name):
        raise ConfigError(path, "name", "allowed: letters, digits, '_', '.', '-' (no path separators or '..')")
    if not config.task:
        raise ConfigError(path, "task", f"is required; allowed: {', '.join(sorted(known_tasks))}")
    if config.task not in known_tasks:
        raise ConfigError(path, "task", f"{config.task!r} is unknown; allowed: {', '.join(sorted(known_tasks))}")
    backend = config.backend or "eager"
    if backend not in known_backends:
        raise ConfigError(path, "backend", f"{backend!r} is unknown; installed: {', '.join(sorted(known_backends))}")
    if config.source.path and config.source.hub_id:
        raise ConfigError(path, "source", "set either path or hub_id, not both")
    if config.source.path and (".." in Path(config.source.path).parts):
        raise ConfigError(path, "source.path", "must not contain '..'; it must stay inside the repository")
    if config.max_batch_size < 0:
        raise ConfigError(path, "max_batch_size", "must be >= 0")
    max_batch_size = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if config.max_sequence_length < 0:
        raise ConfigError(path, "max_sequence_length", "must be >= 0 (0: the tokenizer's maximum)")
    if config.truncation not in Truncation.values():
        raise ConfigError(path, "truncation", "allowed: TRUNCATION_RIGHT, TRUNCATION_REJECT")
    for i, group in enumerate(config.instance_group):
        where = f"instance_group[{i}]"
        if group.count < 0:
            raise ConfigError(path, f"{where}.count", "must be >= 0")
        if group.kind == InstanceGroup.KIND_CPU and group.gpus:
            raise ConfigError(path, f"{where}.gpus", "only allowed with kind: KIND_GPU")
        if any(g < 0 for g in group.gpus):
            raise ConfigError(path, f"{where}.gpus", "device ordinals must be >= 0")
    batching = config.dynamic_batching
    if batching.max_queue_delay_microseconds < 0:
        raise ConfigError(path, "dynamic_batching.max_queue_delay_microseconds", "must be >= 0")
    for size in batching.preferred_batch_size:
        if not 0 < size <= max_batch_size:
            raise ConfigError(
                path, "dynamic_batching.preferred_batch_size", f"{size} must be in 1..max_batch_size ({max_batch_size})"
            )
    if batching.max_queue_size < 0:
        raise ConfigError(path, "dynamic_batching.max_queue_size", f"must be >= 0 (0: {DEFAULT_MAX_QUEUE_SIZE})")
    if batching.priority_levels < 0 or batching.default_priority_level < 0:
        raise ConfigError(path, "dynamic_batching.priority_levels", "must be >= 0")
    if batching.priority_levels and batching.default_priority_level > batching.priority_levels:
        raise ConfigError(path, "dynamic_batching.default_priority_level", "must be <= priority_levels")
    policy = config.version_policy
    if policy.WhichOneof("policy") == "latest" and policy.latest.num_versions < 0:
        raise ConfigError(path, "version_policy.latest.num_versions", "must be >= 1")
    limits = config.generation
    for name in ("max_concurrent_sequences", "max_tokens_per_step", "max_stream_buffer", "max_new_tokens_limit",
                 "refill_wait_microseconds"):
        if getattr(limits, name) < 0:
            raise ConfigError(path, f"generation.{name}", "must be >= 0")


def _settings(config: ModelConfig, folder_name: str, path: Path) -> ModelSettings:
    """The checked config as settings; proto3's zeros become the defaults here, and only here."""
    batching = config.dynamic_batching
    queue_size = batching.max_queue_size or DEFAULT_MAX_QUEUE_SIZE
    limits = config.generation
    generation_defaults = GenerationSettings()
    policy = config.version_policy
    kind = policy.WhichOneof("policy") or "latest"
    return ModelSettings(
        name=config.name or folder_name,
        task=config.task,
        backend=config.backend or "eager",
        source=SourceSettings(config.source.path, config.source.hub_id, config.source.revision),
        instance_groups=tuple(InstanceGroupSettings(g.count or 1, _KINDS[g.kind], tuple(g.gpus))
                              for g in config.instance_group),
        max_batch_size=config.max_batch_size or DEFAULT_MAX_BATCH_SIZE,
        batching=BatchingSettings(
            enabled=config.HasField("dynamic_batching"),
            max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
            preferred_batch_sizes=tuple(batching.preferred_batch_size),
            max_queue_size=queue_size,
            priority_levels=batching.priority_levels,
            default_priority_level=batching.default_priority_level,
        ),
        max_sequence_length=config.max_sequence_length,
        truncation=_TRUNCATIONS[config.truncation],
        labels=tuple(config.parameters.labels),
        defaults=frozen_mapping({key: _parse_default(text) for key, text in config.parameters.defaults.items()}),
        version_policy=VersionPolicy(
            kind=kind,
            num_versions=(policy.latest.num_versions or 1) if kind == "latest" else 0,
            versions=tuple(sorted(policy.specific.versions)) if kind == "specific" else (),
        ),
        generation=GenerationSettings(
            max_concurrent_sequences=limits.max_concurrent_sequences or generation_defaults.max_concurrent_sequences,
            max_tokens_per_step=limits.max_tokens_per_step or generation_defaults.max_tokens_per_step,
            max_stream_buffer=limits.max_stream_buffer or generation_defaults.max_stream_buffer,
            max_new_tokens_limit=limits.max_new_tokens_limit or generation_defaults.max_new_tokens_limit,
            max_waiting=queue_size,
            refill_wait=(limits.refill_wait_microseconds / 1e6 if limits.HasField("refill_wait_microseconds")
                         else generation_defaults.refill_wait),
        ),
        backend_parameters=frozen_mapping(config.backend_parameters),
        trust_remote_code=config.trust_remote_code,
        default_for_task=config.default_for_task,
    )


def _parse_default(text: str) -> Any:
    """A `parameters.defaults` value: JSON where it is JSON (numbers, booleans, lists), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def settings_to_proto(settings: ModelSettings) -> ModelConfig:
    """The settings as the pipeserve.v1.ModelConfig message (GetModel), defaults written out."""
    kinds = {v: k for k, v in _KINDS.items()}
    config = ModelConfig(
        name=settings.name, task=settings.task, backend=settings.backend,
        max_batch_size=settings.max_batch_size, max_sequence_length=settings.max_sequence_length,
        truncation=Truncation.TRUNCATION_REJECT if settings.truncation == "reject" else Truncation.TRUNCATION_RIGHT,
        trust_remote_code=settings.trust_remote_code, default_for_task=settings.default_for_task,
    )
    config.source.path, config.source.hub_id, config.source.revision = (
        settings.source.path, settings.source.hub_id, settings.source.revision)
    for group in settings.instance_groups:
        config.instance_group.add(count=group.count, kind=kinds[group.kind], gpus=list(group.gpus))
    batching = settings.batching
    if batching.enabled:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        config.dynamic_batching.max_queue_size = batching.max_queue_size
        config.dynamic_batching.priority_levels = batching.priority_levels
        config.dynamic_batching.default_priority_level = batching.default_priority_level
    config.parameters.labels.extend(settings.labels)
    for key, value in settings.defaults.items():
        config.parameters.defaults[key] = value if isinstance(value, str) else json.dumps(value)
    policy = settings.version_policy
    if policy.kind == "all":
        config.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        config.version_policy.specific.versions.extend(policy.versions)
    else:
        config.version_policy.latest.num_versions = policy.num_versions
    limits = settings.generation
    config.generation.max_concurrent_sequences = limits.max_concurrent_sequences
    config.generation.max_tokens_per_step = limits.max_tokens_per_step
    config.generation.max_stream_buffer = limits.max_stream_buffer
    config.generation.max_new_tokens_limit = limits.max_new_tokens_limit
    config.generation.refill_wait_microseconds = round(limits.refill_wait * 1e6)
    config.backend_parameters.update(settings.backend_parameters)
    return config


def model_config_text(fields: Mapping[str, Any]) -> str:
    """config.pbtxt text for `fields`, a dict shaped like the ModelConfig message (as JSON would
    spell it: {"name": ..., "instance_group": [{"count": 1, "kind": "KIND_CPU"}], ...}). Unknown
    fields raise ValueError."""
    config = json_format.ParseDict(dict(fields), ModelConfig())
    return text_format.MessageToString(config)


def write_model_config(folder: Path, fields: Mapping[str, Any]) -> Path:
    """Writes `folder`/config.pbtxt from `fields` (see model_config_text); returns its path. The
    file appears whole (written beside it, then renamed), so a polling server never reads half."""
    path = Path(folder) / CONFIG_FILE
    partial = path.with_name(f".{CONFIG_FILE}.partial")
    partial.write_text(model_config_text(fields), encoding="utf-8")
    partial.replace(path)
    return path


def read_model_config_fields(path: Path) -> dict[str, Any]:
    """A config.pbtxt as the dict write_model_config takes (for tools that rewrite a config)."""
    return json_format.MessageToDict(parse_model_config(path), preserving_proto_field_name=True)
