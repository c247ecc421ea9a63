"""The Backend interface: the one seam between pipeserve and whatever runs a model.

A backend sees tensors and devices, never text, tasks or protocols. Like Triton's backends it has
three moves: `load` (initialize) a model for a device, `Instance.run` (execute) a batch of named
tensors, `Instance.close` (finalize). Generation adds optional steps that the generation engine
drives (`generate`, and `prefill`/`decode` with cache handles, or `step` for both at once) where a
backend supports them.

A backend is a class registered under the entry-point group ``pipeserve.backends``; a third
party adds one from its own package without touching the server:

    [project.entry-points."pipeserve.backends"]
    my-backend = "my_package.backend:MyBackend"

Everything a backend needs is here and in `pipeserve.backends.errors` (re-exported here): a backend
imports nothing from `pipeserve.server`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeserve.backends.errors import BackendError, BackendUnavailable, InstanceDead, PipeserveError

__all__ = [
    "Backend", "BackendError", "BackendUnavailable", "DecoderState", "Instance", "InstanceDead", "ModelSpec",
    "PipeserveError",
]


@dataclass(frozen=True)
class ModelSpec:
    """What a backend needs to load one model version."""

    name: str
    version: int
    # Local folder with the model's files, or None for a hub model (then hub_id is set).
    local_path: Path | None
    hub_id: str = ""
    revision: str = ""
    # The transformers Auto class the task needs (e.g. "AutoModelForSequenceClassification"); a
    # backend that runs exported artefacts may ignore it.
    model_class: str = "AutoModel"
    # config.pbtxt's backend_parameters, verbatim.
    parameters: Mapping[str, str] = field(default_factory=dict)
    trust_remote_code: bool = False
    # Tensor names the task will send and read; backends with fixed signatures (Triton,
    # TorchScript) check them at load time.
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()


class DecoderState(abc.ABC):
    """The keys and values of the sequences one instance decodes together: row i is sequence i.

    Made by `Instance.prefill`, grown by `Instance.decode`, and owned by the instance that made it
    (touched only from its worker thread). The generation engine never looks inside: it merges
    the state of newly prefilled sequences into its running batch (`extend`) and drops the rows of
    finished or cancelled ones (`release`), so a backend keeps whatever layout suits its device.
    """

    @property
    @abc.abstractmethod
    def rows(self) -> int:
        """Sequences held."""

    @abc.abstractmethod
    def extend(self, other: DecoderState) -> None:
        """Appends `other`'s rows after this state's rows, in order; `other` is used up."""

    @abc.abstractmethod
    def release(self, rows: Sequence[int]) -> list[int]:
        """Drops `rows` and frees their room. Returns the new row order: entry i is the old index
        of the row now at i (a backend may move rows to fill the holes instead of shifting all)."""


class Instance(abc.ABC):
    """One copy of a model on one device. Called from one worker thread at a time."""

    device: torch.device

    @abc.abstractmethod
    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs one batch. Inputs and outputs are CPU tensors keyed by name."""

    def generate(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """Whole-sequence generation (encoder-decoder tasks): returns token ids [batch, length]."""
        raise NotImplementedError(f"{type(self).__name__} does not support generate()")

    @property
    def supports_generate(self) -> bool:
        return type(self).generate is not Instance.generate

    # Step-wise decoding for continuous batching (decoder-only models). Optional: a backend
    # without it cannot serve text-generation, and the model fails to load with a config error.

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        """Runs whole prompts (token ids, at least one each, any lengths). Returns the logits at
        each prompt's last position [len(prompts), vocab] (float32, CPU) and a new state that holds
        the prompts' keys and values, one row per prompt in order."""
        raise NotImplementedError(f"{type(self).__name__} does not support step-wise decoding")

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        """One step for every row of `state`: `tokens` [rows] (int64, CPU) holds each row's newest
        token. Returns the next-token logits [rows, vocab] (float32, CPU); each row grows by one."""
        raise NotImplementedError(f"{type(self).__name__} does not support step-wise decoding")

    @property
    def supports_decoding(self) -> bool:
        return type(self).decode is not Instance.decode

    def step(self, state: DecoderState | None, tokens: torch.Tensor,
             prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        """Optional (`supports_joint_steps`): a decode step and a prefill in ONE forward, so that the
        weights are read once for both. Every row of `state` (None: no rows yet) advances by its
        token in `tokens` [rows], and `prompts` join as new rows after them. Returns the logits
        [rows + len(prompts), vocab] (float32, CPU: the rows' next tokens, then each prompt's last
        position) and the state with the prompts' rows appended."""
        raise NotImplementedError(f"{type(self).__name__} does not support joint steps")

    @property
    def supports_joint_steps(self) -> bool:
        return type(self).step is not Instance.step

    def warm_up(self) -> None:
        """Runs once in the instance's worker thread before the instance takes work, and again
        after it is reloaded: for preparation that depends on that thread (its thread counts)."""

    def ready(self) -> bool:
        """False while the instance cannot run work (a remote server is down)."""
        return True

    def close(self) -> None:
        """Frees the instance's memory; no call follows."""


class Backend(abc.ABC):
    """A backend plugin: makes Instances of models on devices."""

    #: The name configs use in their `backend:` field.
    name: str = ""

    @abc.abstractmethod
    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        """Loads one instance of the model onto `device`. Runs in a worker thread."""

    def devices(self, requested: list[torch.device]) -> list[torch.device]:
        """Devices this backend can place instances on; remote backends return [cpu]."""
        return requested
