"""A model's settings as the rest of the server sees them: typed, frozen, every default filled in.

`repository/config.py` parses a config.pbtxt and validates it into a `ModelSettings` once, at the
repository boundary (as MLServer's ModelSettings). Nothing past that boundary reads the protobuf or
re-derives a default: the numbers below are the only place each default is written down.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_QUEUE_SIZE = 1024

# Instance kinds: "auto" takes a GPU where one is visible, else the CPU.
INSTANCE_KINDS = ("auto", "cpu", "gpu")
# What a tokenizing task does with an input longer than the model takes.
TRUNCATIONS = ("right", "reject")


def frozen_mapping(values: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(values or {}))


@dataclass(frozen=True)
class SourceSettings:
    """Where a model's files come from: a folder in the repository (path, default: the model's
    own folder) or a hub id (loaded by transformers where a network exists)."""

    path: str = ""
    hub_id: str = ""
    revision: str = ""


@dataclass(frozen=True)
class InstanceGroupSettings:
    """`count` copies of the model on each device of the group (each listed GPU, or the CPU)."""

    count: int = 1
    kind: str = "auto"
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class BatchingSettings:
    """The dynamic batcher of a model (config.pbtxt `dynamic_batching`)."""

    # False when config.pbtxt has no dynamic_batching block: each request's inputs batch together,
    # but requests do not merge with one another (Triton's rule).
    enabled: bool = False
    max_queue_delay_microseconds: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    priority_levels: int = 0
    default_priority_level: int = 0

    @property
    def max_queue_delay_s(self) -> float:
        return self.max_queue_delay_microseconds / 1e6


@dataclass(frozen=True)
class GenerationSettings:
    """The continuous batching engine's limits (config.pbtxt `generation`)."""

    max_concurrent_sequences: int = 32
    max_tokens_per_step: int = 2048
    max_stream_buffer: int = 256
    max_new_tokens_limit: int = 512
    # Sequences waiting for a row beyond which new ones get RESOURCE_EXHAUSTED
    # (dynamic_batching.max_queue_size).
    max_waiting: int = DEFAULT_MAX_QUEUE_SIZE
    # Seconds a step in which sequences finished waits for requests to take their rows (0: none).
    # 10 ms: on the 2-core development VM, a closed-loop client's next request arrived 1.7-6.9 ms
    # (p10-max) after its stream's last token under load.
    refill_wait: float = 0.010


@dataclass(frozen=True)
class VersionPolicy:
    """Which numbered version folders serve: the newest `num_versions`, all, or those listed."""

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelSettings:
    name: str
    task: str
    backend: str = "eager"
    source: SourceSettings = SourceSettings()
    # Empty: one instance of kind "auto".
    instance_groups: tuple[InstanceGroupSettings, ...] = ()
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batching: BatchingSettings = BatchingSettings()
    # 0: the tokenizer's (or the model's) maximum.
    max_sequence_length: int = 0
    truncation: str = "right"
    # Class labels for classifiers whose config has none (parameters.labels).
    labels: tuple[str, ...] = ()
    # Request parameter defaults (parameters.defaults), parsed once: JSON where the text is JSON.
    defaults: Mapping[str, Any] = field(default_factory=frozen_mapping)
    version_policy: VersionPolicy = VersionPolicy()
    generation: GenerationSettings = GenerationSettings()
    # Passed to the backend verbatim.
    backend_parameters: Mapping[str, str] = field(default_factory=frozen_mapping)
    trust_remote_code: bool = False
    default_for_task: bool = False

    @property
    def pretrained_kwargs(self) -> dict[str, Any]:
        """What from_pretrained takes besides the folder or hub id."""
        kwargs: dict[str, Any] = {"trust_remote_code": self.trust_remote_code}
        if self.source.revision:
            kwargs["revision"] = self.source.revision
        return kwargs
