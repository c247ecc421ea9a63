"""A backend plugin that injects faults, for tests/test_faults.py: the eager backend, plus trigger
tokens (set in config.pbtxt `backend_parameters`) that make an instance raise or die.

    raise_on_token: "<id>"   a batch holding this token id raises RuntimeError (the instance lives on)
    die_on_token: "<id>"     a batch holding this token id raises InstanceDead, and so does every
                             later call on that instance: it stays dead until the server replaces it

For generation the triggers are looked for in the prompts that a prefill or joint step runs.

Registered under the entry-point group `pipeserve.backends` as "faulty" by `install_plugin`,
which writes a dist-info into a folder that then goes on sys.path (or PYTHONPATH).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeserve.backends.base import DecoderState, Instance, InstanceDead, ModelSpec
from pipeserve.backends.eager import EagerBackend

from tests.wrapped_instance import WrappedInstance

NAME = "faulty"


class FaultInjectingInstance(WrappedInstance):
    def __init__(self, inner: Instance, raise_on: int | None, die_on: int | None):
        super().__init__(inner)
        self.raise_on = raise_on
        self.die_on = die_on
        self.dead = False

    def _holds(self, ids: torch.Tensor, token: int | None) -> bool:
        return token is not None and bool((ids == token).any())

    def _check(self, ids: torch.Tensor) -> None:
        if self.dead:
            raise InstanceDead("the instance's worker is gone")
        if self._holds(ids, self.die_on):
            self.dead = True
            raise InstanceDead("the worker crashed on a poisoned batch")
        if self._holds(ids, self.raise_on):
            raise RuntimeError("injected fault: the model raised on this batch")

    @staticmethod
    def _prompt_ids(prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor([t for prompt in prompts for t in prompt], dtype=torch.long)

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._check(inputs["input_ids"])
        return super().run(inputs)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        self._check(self._prompt_ids(prompts))
        return super().prefill(prompts)

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        self._check(torch.zeros(0, dtype=torch.long))
        return super().decode(state, tokens)

    def step(self, state: DecoderState | None, tokens: torch.Tensor,
             prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        self._check(self._prompt_ids(prompts))
        return super().step(state, tokens, prompts)


class FaultInjectingBackend(EagerBackend):
    """Loads like the eager backend; counts loads per model, and can be told to fail reloads."""

    name = NAME
    loads: Counter = Counter()
    # While cleared, every load after a model's first fails (a replacement that cannot come up).
    reloads_allowed = threading.Event()
    reloads_allowed.set()

    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        FaultInjectingBackend.loads[spec.name] += 1
        if FaultInjectingBackend.loads[spec.name] > 1 and not FaultInjectingBackend.reloads_allowed.is_set():
            raise RuntimeError("injected fault: the replacement instance failed to load")
        token = {key: int(spec.parameters[key]) if key in spec.parameters else None
                 for key in ("raise_on_token", "die_on_token")}
        return FaultInjectingInstance(super().load(spec, device), token["raise_on_token"], token["die_on_token"])


def install_plugin(folder: Path) -> Path:
    """Writes the dist-info that registers the backend; put `folder` on sys.path or PYTHONPATH."""
    info = folder / "pipeserve_fault_backend-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pipeserve-fault-backend\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[pipeserve.backends]\n{NAME} = {__name__}:FaultInjectingBackend\n")
    return folder
