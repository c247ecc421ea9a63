"""The runner: executes the scheduler's steps on one instance's backend, in its worker thread.

It holds the running batch's keys and values (the backend's `DecoderState`; row i is the
scheduler's `running[i]`) and gives back logits, one row per sequence, for the output processor.
Where the backend has joint steps (`Instance.step`), a step is ONE forward for the running rows'
next tokens and the new prompts together, so the weights are read once for both; otherwise a
prefill (new prompts) and a decode (running rows) are separate forwards.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq

import torch
from pipeserve.backends.base import DecoderState, Instance
from pipeserve.server.generation.sequence import SequenceState
from pipeserve.server.scheduling.instances import ModelInstance


def _prompts(seqs: Seq[SequenceState]) -> list[list[int]]:
    return [seq.plan.prompt_ids for seq in seqs]  # type: ignore[union-attr]  # admitted: planned


def _newest_tokens(seqs: Seq[SequenceState]) -> torch.Tensor:
    return torch.tensor([seq.generated[-1] for seq in seqs], dtype=torch.long)


def _first_token(prompts: Seq[SequenceState]) -> None:
    """The prompts ran: the logits of their first tokens are here (time to first token)."""
    now = time.monotonic()
    for seq in prompts:
        seq.first_token_at = now


class StepRunner:
    """One instance's forwards. Raises what the backend raises; the engine maps it
    (scheduling/execution.py), and after a failed forward the state is gone (`reset`)."""

    def __init__(self, instance: ModelInstance):
        self.instance = instance
        self.joint_steps = instance.backend_instance.supports_joint_steps
        self.state: DecoderState | None = None

    @property
    def backend(self) -> Instance:
        # Read at each step: a dead instance's replacement takes its place in the ModelInstance.
        return self.instance.backend_instance

    def joint_step(self, running: Seq[SequenceState], prompts: Seq[SequenceState]) -> torch.Tensor:
        """Every running row advances by its newest token and the prompts run, in one forward.
        Returns logits [running + prompts, vocab]; the prompts are the state's last rows now."""
        logits, self.state = self.backend.step(self.state, _newest_tokens(running), _prompts(prompts))
        _first_token(prompts)
        return logits

    def prefill(self, prompts: Seq[SequenceState]) -> tuple[torch.Tensor, DecoderState]:
        """The prompts' forward: their logits [prompts, vocab] and a new state holding their rows,
        which `add` then joins to the running batch."""
        logits, prefilled = self.backend.prefill(_prompts(prompts))
        _first_token(prompts)
        return logits, prefilled

    def add(self, prefilled: DecoderState, ended: Seq[int]) -> list[int]:
        """The prefilled rows join the running batch, after its rows, less those that `ended` at
        their first token. Returns the prefill's indices of the rows that joined, in their order."""
        order = prefilled.release(ended) if ended else list(range(prefilled.rows))
        if order:
            if self.state is None:
                self.state = prefilled
            else:
                self.state.extend(prefilled)
        return order

    def decode(self, running: Seq[SequenceState]) -> torch.Tensor:
        """Every running row advances by its newest token: logits [running, vocab]."""
        assert self.state is not None
        return self.backend.decode(self.state, _newest_tokens(running))

    def release(self, rows: Seq[int]) -> list[int]:
        """Drops rows of the running batch; returns the new row order (DecoderState.release)."""
        assert self.state is not None
        return self.state.release(rows)

    def reset(self) -> None:
        """After a failed joint or decode forward the batch's keys and values are in an unknown state: they go."""
        self.state = None
