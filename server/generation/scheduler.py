"""The scheduler: which sequences each step of one instance runs (vLLM's scheduler, in small).

Sequences wait for a row in arrival order. Before a step, `take` moves as many as
`max_concurrent_sequences` leaves room for out of the queue; at the step's start, in the worker
thread, `admit` prepares their plans (the task tokenizes) and keeps the prompts that fit the
step's `max_tokens_per_step`, the first always (a long prompt never starves); the others go back
to the head of the queue (`requeue`), and those past their deadline or whose plan failed leave
with their error. Running rows that were cancelled or ran past their deadline leave before the
forward (`leaving`). After a step in which sequences finished, `refill_wait` says how long the
loop gives new requests to take their rows. Across a model's instances, `place` puts a new
sequence on the least loaded ready instance, or refuses it (Overloaded) past `max_waiting`.

Plain Python: no tensors and no forward. The runner runs what the scheduler decides; the engine's
loop calls both.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from pipeserve.server.errors import BackendError, DeadlineExceeded, Overloaded, PipeserveError
from pipeserve.server.generation.sequence import SequenceState
from pipeserve.server.repository.model_settings import GenerationSettings

log = logging.getLogger("pipeserve.generation")

# Sequences that leave at a step's start, each with the error it ends with.
Failures = list[tuple[SequenceState, PipeserveError]]


@dataclass
class Admission:
    """What a step does with the sequences taken for it."""

    # Planned, within the step's token budget: their prompts run in this step, in this order.
    ready: list[SequenceState] = field(default_factory=list)
    # Past the token budget: back to the head of the queue, for a later step.
    deferred: list[SequenceState] = field(default_factory=list)
    failed: Failures = field(default_factory=list)


class Scheduler:
    """One instance's sequences: `waiting` for a row, `admitting` (taken for the step in progress)
    and `running` (the rows of the instance's decoder state, in order). The event loop queues and
    takes between steps; the worker thread admits, joins and releases during them."""

    def __init__(self, label: str, limits: GenerationSettings):
        self.label = label
        self.limits = limits
        self.waiting: deque[SequenceState] = deque()
        self.admitting: list[SequenceState] = []
        self.running: list[SequenceState] = []

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.admitting) + len(self.running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def enqueue(self, seq: SequenceState) -> None:
        self.waiting.append(seq)

    def withdraw(self, seq: SequenceState) -> None:
        """The sequence's reader left: a waiting sequence leaves now, a running one at the next step."""
        seq.stop_requested = True
        try:
            self.waiting.remove(seq)
        except ValueError:
            pass  # admitted or running: the step drops it

    # -- a step (admission) --------------------------------------------------------------------

    def take(self) -> list[SequenceState]:
        """Before a step (event loop): the waiting sequences that the free rows allow, oldest first."""
        room = max(self.limits.max_concurrent_sequences - len(self.running), 0)
        self.admitting = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        return self.admitting

    def admit(self, taken: Iterable[SequenceState], now: float) -> Admission:
        """At the step's start (worker thread): prepares the taken sequences' plans and splits them
        into the prompts that fit this step's token budget (the first always fits), the deferred
        and the failed. A cancelled one is dropped."""
        admission = Admission()
        budget = self.limits.max_tokens_per_step - len(self.running)
        for seq in taken:
            if seq.stop_requested:
                continue
            if seq.expired(now):
                admission.failed.append((seq, DeadlineExceeded("the deadline passed while the sequence waited for a slot")))
                continue
            if seq.plan is None:
                try:
                    seq.plan = seq.make_plan()
                except PipeserveError as exc:
                    admission.failed.append((seq, exc))
                    continue
                except Exception as exc:  # a tokenizer bug fails its sequence, never the engine
                    log.exception("model %s failed to prepare a sequence", self.label)
                    admission.failed.append((seq, BackendError(f"preparing the sequence failed: {type(exc).__name__}: {exc}")))
                    continue
            cost = len(seq.plan.prompt_ids)
            if admission.deferred or (admission.ready and cost > budget):
                admission.deferred.append(seq)
                continue
            budget -= cost
            admission.ready.append(seq)
        return admission

    def requeue(self, deferred: Seq[SequenceState]) -> None:
        """After the step (event loop): the deferred go back to the head of the queue, in order."""
        self.admitting = []
        self.waiting.extendleft(reversed(deferred))

    # -- a step (the running rows) -------------------------------------------------------------

    def leaving(self, now: float) -> tuple[list[int], Failures]:
        """Before the forward (worker thread): the running rows to release, cancelled ones and
        those past their deadline (which fail)."""
        rows: list[int] = []
        failed: Failures = []
        for i, seq in enumerate(self.running):
            if seq.stop_requested:
                rows.append(i)
            elif seq.expired(now):
                rows.append(i)
                failed.append((seq, DeadlineExceeded("the deadline passed during generation")))
        return rows, failed

    def finished_rows(self) -> list[int]:
        return [i for i, seq in enumerate(self.running) if seq.finished]

    def join(self, ready: Seq[SequenceState]) -> None:
        """The ready prompts ran: they are the decoder state's last rows now."""
        self.running += ready

    def reorder(self, order: Seq[int]) -> None:
        """Rows were released: `order[i]` is the old index of the row now at i (DecoderState.release)."""
        self.running = [self.running[i] for i in order]

    def refill_wait(self, finished: bool, closing: bool) -> float:
        """Seconds to wait after a step for new requests to take the rows it freed (0: go on).

        A client that sends its next request as soon as its last one ends (chat turns, agents,
        pipelines) then joins the very next step rather than waiting out a whole one. Only after
        a step in which sequences `finished`, and never when requests wait already, when nothing
        runs (the loop idles until an arrival anyway) or when the engine is `closing`."""
        if not self.limits.refill_wait or self.waiting or not self.running or closing or not finished:
            return 0.0
        return self.limits.refill_wait

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> list[SequenceState]:
        """Every sequence, waiting, taken or running: each is to stop (the engine is closing);
        the waiting leave now, the others at the next step."""
        everyone = [*self.waiting, *self.admitting, *self.running]
        for seq in everyone:
            seq.stop_requested = True
        self.waiting.clear()
        return everyone

    def drop_all(self) -> list[SequenceState]:
        """Every sequence, now out of the scheduler (a step failed in a way that lost them all)."""
        lost = [*self.running, *self.admitting, *self.waiting]
        self.running, self.admitting = [], []
        self.waiting.clear()
        return lost


def place(schedulers: Seq[Scheduler], ready: Seq[bool], limits: GenerationSettings, label: str) -> int:
    """The instance a new sequence queues on (its index): the least loaded ready one (of all while
    none is ready: the sequence then waits for one to come back). Raises Overloaded when
    `max_waiting` sequences wait across the instances already."""
    waiting = sum(len(s.waiting) for s in schedulers)
    if waiting >= limits.max_waiting:
        raise Overloaded(f"model {label} has {waiting} sequences waiting (limit {limits.max_waiting}); "
                         "retry with backoff")
    candidates = [i for i, ok in enumerate(ready) if ok] or list(range(len(schedulers)))
    return min(candidates, key=lambda i: schedulers[i].load)
