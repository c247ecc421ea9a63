"""Running work on a model instance, the same for the dynamic batcher (a batch of inputs) and the
generation engine (a step of sequences): what a failure becomes, what a dead instance sets off
and what an execution counts.

    InstanceDead       the work fails UNAVAILABLE; the instance goes to "restarting" and the
                       model's restart policy (`on_instance_dead`) loads a replacement, or, with
                       none, it stays "dead"; no work goes to it meanwhile
    a PipeserveError   passes through: the backend or the task said what is wrong
    anything else      BackendError (INTERNAL) with the exception's type and message; the
                       instance keeps serving (a model bug fails its work, never the server)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeserve.backends.base import InstanceDead
from pipeserve.server.errors import BackendError, BackendUnavailable, PipeserveError
from pipeserve.server.scheduling.instances import ModelInstance
from pipeserve.server.scheduling.stats import ModelStats

log = logging.getLogger("pipeserve.scheduler")

# Called on the event loop when work finds its instance dead (the backend raised InstanceDead).
OnInstanceDead = Callable[[ModelInstance, InstanceDead], None]


@dataclass(frozen=True)
class FailureWording:
    """How the errors name the work that failed: `failed` continues "model <label> failed ..."; `died`
    is the whole message of a dead instance, with {label}, {index} and {error} filled in."""

    failed: str
    died: str


BATCH = FailureWording(
    failed="while running the batch",
    died="model {label} instance {index} died while running the batch ({error}); it is being replaced, retry",
)
GENERATION_STEP = FailureWording(
    failed="during generation",
    died="model {label}: the instance died: {error}",
)


@dataclass(frozen=True)
class Failure:
    """What failed work becomes: the error it fails with, and, when the instance died, the
    InstanceDead that the event loop still has to act on (`Execution.instance_died`)."""

    error: PipeserveError
    died: InstanceDead | None = None


class Execution:
    """One model version's rules for the work its instances run."""

    def __init__(self, label: str, stats: ModelStats, on_instance_dead: OnInstanceDead | None,
                 wording: FailureWording):
        self.label = label
        self.stats = stats
        # Replaces an instance whose backend raised InstanceDead (the model's restart policy).
        self.on_instance_dead = on_instance_dead
        self.wording = wording

    def failure(self, exc: Exception, instance: ModelInstance, work: str) -> Failure:
        """What `exc`, raised while `instance` ran `work` ("a batch of 4", for the log), fails the
        work with. Any thread; log lines name the model, the instance and the work."""
        if isinstance(exc, InstanceDead):
            log.error("model %s instance %d died while running %s: %s", self.label, instance.index, work, exc)
            message = self.wording.died.format(label=self.label, index=instance.index, error=exc)
            return Failure(BackendUnavailable(message), exc)
        if isinstance(exc, PipeserveError):
            return Failure(exc)
        log.error("model %s failed on %s", self.label, work, exc_info=exc)
        return Failure(BackendError(f"model {self.label} failed {self.wording.failed}: {type(exc).__name__}: {exc}"))

    def instance_died(self, instance: ModelInstance, died: InstanceDead) -> None:
        """On the event loop, after work found `instance` dead: no work goes to it until it is
        replaced; without a way to replace it, it stays dead."""
        hook = self.on_instance_dead
        instance.state = "restarting" if hook is not None else "dead"
        if hook is not None:
            hook(instance, died)

    def executed(self, size: int, seconds: float) -> None:
        """One execution (a forward) ran `size` inputs or sequences in `seconds` (event loop)."""
        stats = self.stats
        stats.executions += 1
        stats.inferences += size
        stats.batch_sizes[size] += 1
        stats.compute.add(seconds)
        if stats.listeners:
            stats.notify("batch", size)
            stats.notify("compute_seconds", seconds)
