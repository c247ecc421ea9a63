"""The Backend interface: the one seam between pipeserve and whatever runs a model.

A backend sees tensors and devices, never text, tasks or protocols. Like Triton's backends it has
three moves: `load` (initialize) a model for a device, `Instance.run` (execute) a batch of named
tensors, `Instance.close` (finalize). Generation adds optional steps that the generation engine
drives (`generate`, and `prefill`/`decode` with cache handles) where a backend supports them.

A backend is a class registered under the entry-point group ``pipeserve.backends``; a third
party adds one from its own package without touching the server:

    [project.entry-points."pipeserve.backends"]
    my-backend = "my_package.backend:MyBackend"
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
