"""A backend plugin for tests/test_scheduler.py: the eager backend behind a gate the test holds.

While a model's gate is closed, a batch that reaches the model waits in the instance's worker
thread, so the test knows the instance is busy and that what it sends next stays queued; opening
the gate lets everything run. The gate also records each batch's input shape, so a test sees
which inputs the scheduler put together (their lengths identify them).

Registered under the entry-point group `pipeserve.backends` as "gated" by `install_plugin`,
which writes a dist-info into a folder that then goes on sys.path.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from pipeserve.backends.base import DecoderState, Instance, ModelSpec
from pipeserve.backends.eager import EagerBackend

from tests.wrapped_instance import WrappedInstance

NAME = "gated"
# Longest a batch waits at a closed gate, so that a failing test cannot hang the suite.
GATE_TIMEOUT_S = 60.0


class Gate:
    """Holds the batches of one model while closed; records every batch that reached the model."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._changed = threading.Condition()
        # input_ids shape of each batch, in the order the batches reached the model.
        self.shapes: list[tuple[int, ...]] = []
        # torch's intra-op threads in the worker thread as each batch arrived.
        self.threads: list[int] = []
        # Batches (or generation steps) that still pass a closed gate.
        self._passes = 0

    def close(self, after: int = 0) -> None:
        """Closes the gate; the next `after` batches still pass (a generation step is a batch)."""
        with self._changed:
            self._passes = after
            self._open.clear()

    def open(self) -> None:
        self._open.set()

    def arrive(self, shape: tuple[int, ...]) -> None:
        with self._changed:
            self.shapes.append(shape)
            self.threads.append(torch.get_num_threads())
            self._changed.notify_all()
            if self._passes and not self._open.is_set():
                self._passes -= 1
                return
        if not self._open.wait(GATE_TIMEOUT_S):
            raise RuntimeError("the test never opened the gate")

    def wait_for_batches(self, count: int, timeout: float = 30.0) -> None:
        """Blocks until `count` batches have reached the model (running or held)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.shapes) >= count, timeout):
                raise TimeoutError(f"{len(self.shapes)} batches reached the model, expected {count}")


_gates: dict[str, Gate] = {}
_load_gates: dict[str, threading.Event] = {}
_gates_lock = threading.Lock()


def gate(model: str) -> Gate:
    with _gates_lock:
        return _gates.setdefault(model, Gate())


def load_gate(model: str) -> threading.Event:
    """Set (open) unless a test clears it: while clear, loading the model waits (start-up and
    load requests stay in progress, as a big model's would)."""
    with _gates_lock:
        if model not in _load_gates:
            _load_gates[model] = threading.Event()
            _load_gates[model].set()
        return _load_gates[model]


class GatedInstance(WrappedInstance):
    """Batches, and the engine's generation steps (shape: the rows they run), wait at the gate."""

    def __init__(self, inner: Instance, gate: Gate):
        super().__init__(inner)
        self.gate = gate

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.gate.arrive(tuple(inputs["input_ids"].shape))
        return super().run(inputs)

    def step(self, state: DecoderState | None, tokens: torch.Tensor,
             prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        self.gate.arrive((len(tokens) + len(prompts),))
        return super().step(state, tokens, prompts)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        self.gate.arrive((len(prompts),))
        return super().prefill(prompts)

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        self.gate.arrive((len(tokens),))
        return super().decode(state, tokens)


class GatedBackend(EagerBackend):
    name = NAME

    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        if not load_gate(spec.name).wait(GATE_TIMEOUT_S):
            raise RuntimeError("the test never opened the load gate")
        return GatedInstance(super().load(spec, device), gate(spec.name))


def install_plugin(folder: Path) -> Path:
    """Writes the dist-info that registers the backend; put `folder` on sys.path."""
    info = folder / "pipeserve_gated_backend-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pipeserve-gated-backend\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(f"[pipeserve.backends]\n{NAME} = {__name__}:GatedBackend\n")
    return folder
