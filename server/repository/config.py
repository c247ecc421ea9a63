"""Reading and checking `config.pbtxt`: parsed and validated once, then passed down as data."""

from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format

from pipeserve.server.errors import ConfigError
from pipeserve.v1.model_config_pb2 import InstanceGroup, ModelConfig, Truncation

CONFIG_FILE = "config.pbtxt"

# Model names become folder names and metric labels: keep them to a safe, portable alphabet.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_SIZE = 1024


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


def validate_model_config(
    config: ModelConfig,
    path: Path,
    folder_name: str,
    known_tasks: set[str],
    known_backends: set[str],
) -> ModelConfig:
    """Checks a parsed config and fills defaults; every error names the file and field."""
    if not config.name:
        config.name = folder_name
    if config.name != folder_name:
        raise ConfigError(path, "name", f"is {config.name!r} but must equal the folder name {folder_name!r}")
    if not is_valid_model_name(config.name):
        raise ConfigError(path, "name", "allowed: letters, digits, '_', '.', '-' (no path separators or '..')")
    if not config.task:
        raise ConfigError(path, "task", f"is required; allowed: {', '.join(sorted(known_tasks))}")
    if config.task not in known_tasks:
        raise ConfigError(path, "task", f"{config.task!r} is unknown; allowed: {', '.join(sorted(known_tasks))}")
    if not config.backend:
        config.backend = "eager"
    if config.backend not in known_backends:
        raise ConfigError(
            path, "backend", f"{config.backend!r} is unknown; installed: {', '.join(sorted(known_backends))}"
        )
    if config.source.path and config.source.hub_id:
        raise ConfigError(path, "source", "set either path or hub_id, not both")
    if config.source.path and (".." in Path(config.source.path).parts):
        raise ConfigError(path, "source.path", "must not contain '..'; it must stay inside the repository")
    if config.max_batch_size < 0:
        raise ConfigError(path, "max_batch_size", "must be >= 0")
    if config.max_batch_size == 0:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
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
        if not 0 < size <= config.max_batch_size:
            raise ConfigError(
                path, "dynamic_batching.preferred_batch_size", f"{size} must be in 1..max_batch_size ({config.max_batch_size})"
            )
    if batching.max_queue_size < 0:
        raise ConfigError(path, "dynamic_batching.max_queue_size", "must be >= 0 (0: 1024)")
    if batching.priority_levels < 0 or batching.default_priority_level < 0:
        raise ConfigError(path, "dynamic_batching.priority_levels", "must be >= 0")
    if batching.priority_levels and batching.default_priority_level > batching.priority_levels:
        raise ConfigError(path, "dynamic_batching.default_priority_level", "must be <= priority_levels")
    policy = config.version_policy
    if policy.WhichOneof("policy") == "latest" and policy.latest.num_versions < 0:
        raise ConfigError(path, "version_policy.latest.num_versions", "must be >= 1")
    limits = config.generation
    for field in ("max_concurrent_sequences", "max_tokens_per_step", "max_stream_buffer", "max_new_tokens_limit",
                  "refill_wait_microseconds"):
        if getattr(limits, field) < 0:
            raise ConfigError(path, f"generation.{field}", "must be >= 0")
    return config
