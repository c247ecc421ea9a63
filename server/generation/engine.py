"""The continuous (iteration-level) batching engine for decoder-only models.

Each model instance runs one `InstanceDecoder`: a loop of steps, each run in the instance's worker
thread (never on the event loop). A step makes vLLM's four moves, each in its own module:

    schedule         which waiting sequences join, within the step's budgets, and which running
                     ones leave (scheduler.py)
    execute          the forward on the instance's backend: logits per sequence (runner.py)
    process outputs  each sequence's next token, text delta and whether it stopped (outputs.py)
    deliver          on the event loop: each sequence's event to its reader (delivery.py)

Where the backend has joint steps (`Instance.step`; the eager backend does), every step is ONE
forward: every running sequence advances one token and the prompts of sequences that arrived
since the last step run alongside them, giving their first token. That reads the weights once
where a prefill step then a decode step (what the loop alternates for other backends) reads them
twice, and a new prompt never holds the running sequences up for a forward of its own. A sequence
that arrives while a step runs joins at the next step; one that finishes, is cancelled or runs
past its deadline leaves the batch at once, freeing its row.

The engine knows sequences as token ids and the small objects of a `SequencePlan` (chooser,
stopping rules, detokenizer) that the task builds; it never sees prompts as text or protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence as Seq

from pipeserve.backends.base import InstanceDead
from pipeserve.server.errors import ModelNotReady, Overloaded, PipeserveError
from pipeserve.server.generation import outputs
from pipeserve.server.generation.delivery import SequenceOutput
from pipeserve.server.generation.outputs import FinishReason, Outcome, TokenEvent
from pipeserve.server.generation.runner import StepRunner
from pipeserve.server.generation.scheduler import Scheduler, place
from pipeserve.server.generation.sequence import PlanFactory, SequenceState
from pipeserve.server.repository.model_settings import GenerationSettings
from pipeserve.server.scheduling.execution import GENERATION_STEP, Execution, OnInstanceDead
from pipeserve.server.scheduling.instances import InstancePool, ModelInstance
from pipeserve.server.scheduling.stats import ModelStats


class InstanceDecoder:
    """One instance's sequences (its scheduler), its forwards (its runner) and the loop that steps them."""

    def __init__(self, instance: ModelInstance, engine: GenerationEngine):
        self.instance = instance
        self.engine = engine
        self.execution = engine.execution
        self.scheduler = Scheduler(engine.label, engine.limits)
        self.runner = StepRunner(instance)
        # Set by a step whose backend instance died (InstanceDead); handled on the event loop.
        self._died: InstanceDead | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"decoder:{self.engine.label}")

    def enqueue(self, seq: SequenceState) -> None:
        self.scheduler.enqueue(seq)
        self._wakeup.set()

    def cancel(self, seq: SequenceState) -> None:
        self.scheduler.withdraw(seq)
        self.engine.update_stats()

    def wake(self) -> None:
        self._wakeup.set()

    def cancel_all(self) -> None:
        """Ends every sequence now with finish reason "cancelled" (the engine is closing)."""
        for seq in self.scheduler.close():
            seq.output.push(outputs.ending(seq, FinishReason.CANCELLED))
        self.wake()

    # -- the loop (event loop side) ------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self.scheduler.idle:
                self.engine.update_stats()
                if self.engine.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._one_round()
            except Exception as exc:  # a bug in a step must not leave sequences hanging forever
                error = self.execution.failure(exc, self.instance, "a generation round").error
                self.runner.reset()
                self.engine.deliver([(seq, error) for seq in self.scheduler.drop_all()])

    async def _one_round(self) -> None:
        """One joint step; or a prefill step for waiting sequences (while rows are free), then a decode step."""
        loop = asyncio.get_running_loop()
        executor = self.instance.executor
        if self.runner.joint_steps:
            taken = self.scheduler.take()
            started = time.perf_counter()
            outcome, deferred, rows = await loop.run_in_executor(executor, self._joint_step, taken)
            self._executed(rows, started)
            self._admitted(outcome, deferred)
            await self._wait_for_refill(outcome)
            return
        taken = self.scheduler.take()
        if taken:
            outcome, deferred = await loop.run_in_executor(executor, self._prefill_step, taken)
            self._admitted(outcome, deferred)
        if self.scheduler.running:
            started = time.perf_counter()
            outcome, rows = await loop.run_in_executor(executor, self._decode_step)
            self._executed(rows, started)
            self._deliver(outcome)
            await self._wait_for_refill(outcome)

    def _executed(self, rows: int, started: float) -> None:
        if rows:  # a forward ran `rows` sequences: the model's executions and batch sizes
            self.execution.executed(rows, time.perf_counter() - started)

    def _admitted(self, outcome: Outcome, deferred: list[SequenceState]) -> None:
        """After a step that admitted sequences: those that did not fit go back to the head of the
        queue, and the step's results go out."""
        self.scheduler.requeue(deferred)
        self._deliver(outcome)

    def _deliver(self, outcome: Outcome) -> None:
        self.engine.deliver(outcome)
        died, self._died = self._died, None
        if died is not None:
            # The instance is replaced as the batcher replaces one: its sequences have failed with
            # UNAVAILABLE; new ones wait for the replacement.
            self.execution.instance_died(self.instance, died)

    async def _wait_for_refill(self, outcome: Outcome) -> None:
        """After a step in which sequences finished, gives new requests up to `refill_wait` seconds
        to take the rows they freed (Scheduler.refill_wait); goes on at the first arrival."""
        finished = any(isinstance(event, TokenEvent) and event.finish_reason is not None for _, event in outcome)
        wait = self.scheduler.refill_wait(finished, self.engine.closing)
        if not wait:
            return
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait)

    # -- the steps (worker thread): schedule, execute, process outputs ---------------------------

    def _joint_step(self, taken: list[SequenceState]) -> tuple[Outcome, list[SequenceState], int]:
        """Advances every running sequence by one token and prefills the admitted ones, in one
        forward. Returns the events, the sequences deferred to a later step and the rows run."""
        scheduler = self.scheduler
        admission = scheduler.admit(taken, time.monotonic())
        outcome: Outcome = [*admission.failed, *self._drop_leaving()]
        ready = admission.ready
        if not scheduler.running and not ready:
            return outcome, admission.deferred, 0
        try:
            logits = self.runner.joint_step(scheduler.running, ready)
        except Exception as exc:
            # The batch's cache is in an unknown state: every sequence in the step ends with the error.
            outcome += self._failed(scheduler.running + ready, exc)
            scheduler.running = []
            self.runner.reset()
            return outcome, admission.deferred, 0
        scheduler.join(ready)
        rows = len(scheduler.running)
        outcome += outputs.process(scheduler.running, logits)
        self._release(scheduler.finished_rows())
        return outcome, admission.deferred, rows

    def _prefill_step(self, taken: list[SequenceState]) -> tuple[Outcome, list[SequenceState]]:
        admission = self.scheduler.admit(taken, time.monotonic())
        outcome: Outcome = list(admission.failed)
        ready = admission.ready
        if not ready:
            return outcome, admission.deferred
        try:
            logits, prefilled = self.runner.prefill(ready)
        except Exception as exc:
            return outcome + self._failed(ready, exc), admission.deferred
        outcome += outputs.process(ready, logits)
        joined = self.runner.add(prefilled, [i for i, seq in enumerate(ready) if seq.finished])
        self.scheduler.join([ready[i] for i in joined])
        return outcome, admission.deferred

    def _decode_step(self) -> tuple[Outcome, int]:
        """Advances every running sequence by one token; returns the events and the rows run."""
        scheduler = self.scheduler
        outcome = self._drop_leaving()
        rows = len(scheduler.running)
        if not rows:
            return outcome, 0
        try:
            logits = self.runner.decode(scheduler.running)
        except Exception as exc:
            # The batch's cache is in an unknown state: every running sequence ends with the error.
            failed = self._failed(scheduler.running, exc)
            scheduler.running = []
            self.runner.reset()
            return outcome + failed, 0
        outcome += outputs.process(scheduler.running, logits)
        self._release(scheduler.finished_rows())
        return outcome, rows

    def _drop_leaving(self) -> Outcome:
        """Releases the rows of cancelled sequences and of those past their deadline (which fail)."""
        rows, failed = self.scheduler.leaving(time.monotonic())
        self._release(rows)
        return list(failed)

    def _release(self, rows: Seq[int]) -> None:
        if rows:
            self.scheduler.reorder(self.runner.release(rows))

    def _failed(self, seqs: Seq[SequenceState], exc: Exception) -> Outcome:
        failure = self.execution.failure(exc, self.instance, f"a generation step of {len(seqs)} sequences")
        if failure.died is not None:
            self._died = failure.died
        return [(seq, failure.error) for seq in seqs]


class GenerationEngine:
    """Continuous batching for one model version: one InstanceDecoder per instance."""

    def __init__(self, label: str, pool: InstancePool, limits: GenerationSettings, stats: ModelStats,
                 on_instance_dead: OnInstanceDead | None = None):
        self.label = label
        self.limits = limits
        self.stats = stats
        # Replaces an instance whose backend raised InstanceDead (the model's restart policy).
        self.on_instance_dead = on_instance_dead
        self.execution = Execution(label, stats, on_instance_dead, GENERATION_STEP)
        self.closing = False
        self.decoders = [InstanceDecoder(instance, self) for instance in pool.instances]

    def start(self) -> None:
        for decoder in self.decoders:
            decoder.start()

    @property
    def active_sequences(self) -> int:
        """Sequences decoding or waiting for a row."""
        return sum(d.scheduler.load for d in self.decoders)

    def submit(self, make_plan: PlanFactory, deadline: float | None = None,
               buffer_limit: int | None = None) -> SequenceOutput:
        """Queues a sequence; its events come through the returned SequenceOutput. `buffer_limit`:
        unread events before a slow reader's sequence ends with RESOURCE_EXHAUSTED (None: unbounded)."""
        if self.closing:
            raise ModelNotReady(f"model {self.label} is unloading; retry on another version or later")
        try:
            index = place([d.scheduler for d in self.decoders], [d.instance.ready() for d in self.decoders],
                          self.limits, self.label)
        except Overloaded:
            self.stats.rejected += 1
            raise
        decoder = self.decoders[index]
        output = SequenceOutput(buffer_limit, on_cancel=lambda: decoder.cancel(seq))
        seq = SequenceState(make_plan, deadline, output)
        decoder.enqueue(seq)
        self.update_stats()
        return output

    def deliver(self, outcome: Outcome) -> None:
        """Hands a step's results to the sequences' readers (on the event loop)."""
        stats = self.stats
        for seq, result in outcome:
            if isinstance(result, PipeserveError):
                seq.output.fail(result)
                continue
            if len(seq.generated) == len(result.token_ids):  # the sequence's first token
                ttft = seq.time_to_first_token
                stats.time_to_first_token.add(ttft)
                stats.notify("time_to_first_token", ttft)
            stats.generated_tokens += len(result.token_ids)
            if not seq.output.push(result):
                seq.stop_requested = True  # the reader fell too far behind: the next step drops it
        self.update_stats()

    def update_stats(self) -> None:
        self.stats.active_sequences = self.active_sequences

    async def close(self, grace: float = 30.0) -> None:
        """Takes no new sequences; lets those in flight finish for up to `grace` seconds, then ends
        the rest with finish reason "cancelled" (their readers get a last message, not an error)."""
        self.closing = True
        tasks = [d._task for d in self.decoders if d._task is not None and not d._task.done()]
        for decoder in self.decoders:
            decoder.wake()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        if pending:
            for decoder in self.decoders:
                decoder.cancel_all()
            await asyncio.gather(*pending, return_exceptions=True)
        self.update_stats()
