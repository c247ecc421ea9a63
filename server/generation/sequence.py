"""One sequence: the plan the task builds for it, and its state while the engine runs it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeserve.server.generation.delivery import SequenceOutput
    from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
    from pipeserve.server.generation.outputs import StoppingCriteria
    from pipeserve.server.generation.sampling import TokenChooser


@dataclass
class SequencePlan:
    """One sequence as the task prepares it (tokenized, with its own choice and stopping rules)."""

    prompt_ids: list[int]
    chooser: TokenChooser
    stopping: StoppingCriteria
    detokenizer: IncrementalDetokenizer
    # Log probabilities: None for none, else this many alternatives per token (0..20).
    top_logprobs: int | None = None


# Builds a sequence's plan. Runs in the worker thread at admission, since it tokenizes; raising a
# PipeserveError (a prompt too long) fails that sequence alone.
PlanFactory = Callable[[], SequencePlan]


class SequenceState:
    """A sequence inside the engine. The worker thread owns it during a step; the event loop sets
    `stop_requested` (the reader left or fell behind), which the next step honours."""

    def __init__(self, make_plan: PlanFactory, deadline: float | None, output: SequenceOutput):
        self.make_plan = make_plan
        # Made at admission (scheduler.py), in the worker thread.
        self.plan: SequencePlan | None = None
        self.deadline = deadline
        # Where its events go (the reader's end).
        self.output = output
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.generated: list[int] = []
        self.stop_requested = False
        self.finished = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def prompt_tokens(self) -> int:
        return len(self.plan.prompt_ids) if self.plan is not None else 0

    @property
    def time_to_first_token(self) -> float:
        """Seconds from arrival to the first token (0 before it)."""
        return (self.first_token_at or self.arrived) - self.arrived
