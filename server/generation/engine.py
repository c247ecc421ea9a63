"""The continuous (iteration-level) batching engine for decoder-only models.

Each model instance runs one `InstanceDecoder`: a loop of steps, each run in the instance's worker
thread (never on the event loop). Where the backend has joint steps (`Instance.step`; the eager
backend does), every step is one forward pass:

    joint step     every running sequence advances one token, and the prompts of sequences that
                   arrived since the last step run alongside them, giving their first token; their
                   keys and values join the running batch

Otherwise the loop alternates two kinds of step:

    prefill step   new sequences' prompts run and give their first token; their keys and values
                   join the running batch
    decode step    every running sequence advances one token in ONE forward pass

A joint step reads the weights once where prefill-then-decode reads them twice, and a new prompt
does not hold the running sequences up for a forward of its own. A sequence that arrives while a
step runs joins at the next step; one that finishes, is cancelled or runs past its deadline leaves
the batch at once, freeing its row. Between steps the event loop hands each sequence's tokens to
its `SequenceStream`.

The engine knows sequences as token ids and the small objects of a `SequencePlan` (chooser,
stopping rules, detokenizer) that the task builds; it never sees prompts as text or protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from pipeserve.backends.base import DecoderState, InstanceDead
from pipeserve.server.errors import BackendError, DeadlineExceeded, ModelNotReady, Overloaded, PipeserveError
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.server.generation.sampling import TokenChooser
from pipeserve.server.generation.stopping import FinishReason, StoppingCriteria
from pipeserve.server.generation.stream import SequenceStream, TokenEvent, TokenLogprob, TopLogprob
from pipeserve.server.scheduling.instances import InstancePool, ModelInstance
from pipeserve.server.scheduling.stats import ModelStats

log = logging.getLogger("pipeserve.generation")


@dataclass(frozen=True)
class GenerationLimits:
    """config.pbtxt's `generation` block with its defaults filled in."""

    max_concurrent_sequences: int = 32
    max_tokens_per_step: int = 2048
    max_stream_buffer: int = 256
    max_new_tokens_limit: int = 512
    # Sequences waiting for a row beyond which new ones get RESOURCE_EXHAUSTED.
    max_waiting: int = 1024
    # Seconds a step in which sequences finished waits for requests to take their rows (0: none).
    # 10 ms: on the 2-core development VM, a closed-loop client's next request arrived 1.7-6.9 ms
    # (p10-max) after its stream's last token under load.
    refill_wait: float = 0.010

    @classmethod
    def from_config(cls, generation, max_queue_size: int = 0) -> GenerationLimits:
        refill_wait = cls.refill_wait
        if generation.HasField("refill_wait_microseconds"):
            refill_wait = generation.refill_wait_microseconds / 1e6
        return cls(
            max_concurrent_sequences=generation.max_concurrent_sequences or cls.max_concurrent_sequences,
            max_tokens_per_step=generation.max_tokens_per_step or cls.max_tokens_per_step,
            max_stream_buffer=generation.max_stream_buffer or cls.max_stream_buffer,
            max_new_tokens_limit=generation.max_new_tokens_limit or cls.max_new_tokens_limit,
            max_waiting=max_queue_size or cls.max_waiting,
            refill_wait=refill_wait,
        )


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


class _Sequence:
    """A sequence inside the engine. The worker thread owns it during a step; the event loop sets
    `stop_requested` (the reader left or fell behind), which the next step honours."""

    def __init__(self, make_plan: PlanFactory, deadline: float | None, stream: SequenceStream):
        self.make_plan = make_plan
        self.plan: SequencePlan | None = None
        self.deadline = deadline
        self.stream = stream
        self.arrived = time.monotonic()
        self.first_token_at: float | None = None
        self.generated: list[int] = []
        self.stop_requested = False
        self.finished = False

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


# A step's results for the event loop: per sequence an event, or an error that ends it.
Outcome = list[tuple[_Sequence, TokenEvent | PipeserveError]]


class InstanceDecoder:
    """The running batch of one model instance, and the loop that steps it."""

    def __init__(self, instance: ModelInstance, engine: GenerationEngine):
        self.instance = instance
        self.engine = engine
        self.limits = engine.limits
        self.waiting: deque[_Sequence] = deque()
        # The rows of `state`, in order. Changed only by steps (in the worker thread); the event
        # loop reads it between steps.
        self.running: list[_Sequence] = []
        self.state: DecoderState | None = None
        # Taken from `waiting` for the prefill step in progress.
        self._admitting: list[_Sequence] = []
        # Set by a step whose backend instance died (InstanceDead); handled on the event loop.
        self._died: InstanceDead | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.joint_steps = instance.backend_instance.supports_joint_steps

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self._admitting) + len(self.running)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"decoder:{self.engine.label}")

    def enqueue(self, seq: _Sequence) -> None:
        self.waiting.append(seq)
        self._wakeup.set()

    def cancel(self, seq: _Sequence) -> None:
        seq.stop_requested = True
        try:
            self.waiting.remove(seq)  # not admitted yet: leaves now
        except ValueError:
            pass  # running: the next step drops its row
        self.engine.update_stats()

    def wake(self) -> None:
        self._wakeup.set()

    def cancel_all(self) -> None:
        """Ends every sequence now with finish reason "cancelled" (the engine is closing)."""
        for seq in [*self.waiting, *self._admitting, *self.running]:
            seq.stop_requested = True  # the next step drops its row
            plan = seq.plan
            seq.stream.push(TokenEvent(
                finish_reason=FinishReason.CANCELLED,
                prompt_tokens=len(plan.prompt_ids) if plan is not None else 0,
                generated_tokens=len(seq.generated),
                time_to_first_token=(seq.first_token_at - seq.arrived) if seq.first_token_at is not None else 0.0,
            ))
        self.waiting.clear()
        self.wake()

    # -- the loop (event loop side) ------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self.engine.update_stats()
                if self.engine.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._one_round()
            except Exception as exc:  # a bug in a step must not leave sequences hanging forever
                log.exception("model %s: generation step failed", self.engine.label)
                error = BackendError(f"model {self.engine.label} failed during generation: {type(exc).__name__}: {exc}")
                lost = self.running + self._admitting + list(self.waiting)
                self.running, self.state, self._admitting = [], None, []
                self.waiting.clear()
                self.engine.deliver([(seq, error) for seq in lost])

    async def _one_round(self) -> None:
        """One joint step; or a prefill step for waiting sequences (while rows are free), then a decode step."""
        loop = asyncio.get_running_loop()
        executor = self.instance.executor
        room = self.limits.max_concurrent_sequences - len(self.running)
        if self.joint_steps:
            self._admitting = [self.waiting.popleft() for _ in range(min(max(room, 0), len(self.waiting)))]
            started = time.perf_counter()
            outcome, deferred, rows = await loop.run_in_executor(executor, self._joint_step, self._admitting)
            if rows:
                self.engine.record_step(rows, time.perf_counter() - started)
            self._admitted(outcome, deferred)
            await self._wait_for_refill(outcome)
            return
        if self.waiting and room > 0:
            self._admitting = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            outcome, deferred = await loop.run_in_executor(executor, self._prefill_step, self._admitting)
            self._admitted(outcome, deferred)
        if self.running:
            started = time.perf_counter()
            outcome, rows = await loop.run_in_executor(executor, self._decode_step)
            if rows:
                self.engine.record_step(rows, time.perf_counter() - started)
            self.engine.deliver(outcome)
            self._after_death()
            await self._wait_for_refill(outcome)

    def _admitted(self, outcome: Outcome, deferred: list[_Sequence]) -> None:
        """After a step that admitted sequences: those that did not fit go back to the head of the
        queue, and the step's results go out."""
        self._admitting = []
        self.waiting.extendleft(reversed(deferred))
        self.engine.deliver(outcome)
        self._after_death()

    async def _wait_for_refill(self, outcome: Outcome) -> None:
        """After a step in which sequences finished, gives new requests up to `refill_wait` seconds
        to take the rows they freed, so that a client which sends its next request as soon as its
        stream ends (chat turns, agents, pipelines) joins the very next step rather than waiting a
        whole step for it. Returns at the first arrival; skipped when requests are waiting already,
        when nothing runs (the loop idles until an arrival anyway) or when the engine closes."""
        wait = self.limits.refill_wait
        if not wait or self.waiting or not self.running or self.engine.closing:
            return
        if not any(isinstance(event, TokenEvent) and event.finish_reason is not None for _, event in outcome):
            return
        self._wakeup.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), wait)

    def _after_death(self) -> None:
        """The instance died during the step: it is replaced as the batcher replaces one (its
        sequences have failed with UNAVAILABLE; new ones wait for the replacement)."""
        died, self._died = self._died, None
        if died is None:
            return
        hook = self.engine.on_instance_dead
        self.instance.state = "restarting" if hook is not None else "dead"
        if hook is not None:
            hook(self.instance, died)

    # -- the steps (worker thread) -------------------------------------------------------------

    def _admit(self, admitted: list[_Sequence]) -> tuple[Outcome, list[_Sequence], list[_Sequence]]:
        """Prepares the admitted sequences' plans. Returns the failures, the sequences whose prompts
        fit this step's token budget (the first always fits) and those deferred to a later step."""
        outcome: Outcome = []
        ready: list[_Sequence] = []
        deferred: list[_Sequence] = []
        budget = self.limits.max_tokens_per_step - len(self.running)
        now = time.monotonic()
        for seq in admitted:
            if seq.stop_requested:
                continue
            if seq.expired(now):
                outcome.append((seq, DeadlineExceeded("the deadline passed while the sequence waited for a slot")))
                continue
            if seq.plan is None:
                try:
                    seq.plan = seq.make_plan()
                except PipeserveError as exc:
                    outcome.append((seq, exc))
                    continue
                except Exception as exc:  # a tokenizer bug fails its sequence, never the engine
                    log.exception("model %s failed to prepare a sequence", self.engine.label)
                    outcome.append((seq, BackendError(f"preparing the sequence failed: {type(exc).__name__}: {exc}")))
                    continue
            cost = len(seq.plan.prompt_ids)
            # The step's token budget; the first prompt always goes, however long.
            if deferred or (ready and cost > budget):
                deferred.append(seq)
                continue
            budget -= cost
            ready.append(seq)
        return outcome, ready, deferred

    def _joint_step(self, admitted: list[_Sequence]) -> tuple[Outcome, list[_Sequence], int]:
        """Advances every running sequence by one token and prefills the admitted ones, in one
        forward. Returns the events, the sequences deferred to a later step and the rows run."""
        outcome, ready, deferred = self._admit(admitted)
        outcome += self._drop_leaving()
        if not self.running and not ready:
            return outcome, deferred, 0
        tokens = torch.tensor([seq.generated[-1] for seq in self.running], dtype=torch.long)
        try:
            prompts = [seq.plan.prompt_ids for seq in ready]  # type: ignore[union-attr]  # admitted: planned
            logits, state = self.instance.backend_instance.step(self.state, tokens, prompts)
        except Exception as exc:
            # The batch's cache is in an unknown state: every sequence in the step ends with the error.
            failed = self._failed(self.running + ready, exc)
            self.running, self.state = [], None
            return outcome + failed, deferred, 0
        now = time.monotonic()
        for seq in ready:
            seq.first_token_at = now
        self.state = state
        self.running += ready
        rows = len(self.running)
        outcome += self._advance(self.running, logits)
        self._release([i for i, s in enumerate(self.running) if s.finished])
        return outcome, deferred, rows

    def _prefill_step(self, admitted: list[_Sequence]) -> tuple[Outcome, list[_Sequence]]:
        outcome, ready, deferred = self._admit(admitted)
        if not ready:
            return outcome, deferred
        try:
            logits, state = self.instance.backend_instance.prefill([s.plan.prompt_ids for s in ready])  # type: ignore[union-attr]
        except Exception as exc:
            return outcome + self._failed(ready, exc), deferred
        now = time.monotonic()
        for seq in ready:
            seq.first_token_at = now
        outcome += self._advance(ready, logits)
        done = [i for i, s in enumerate(ready) if s.finished]
        if done:
            ready = [ready[i] for i in state.release(done)]
        if ready:
            if self.state is None:
                self.state = state
            else:
                self.state.extend(state)
            self.running += ready
        return outcome, deferred

    def _drop_leaving(self) -> Outcome:
        """Releases the rows of cancelled sequences and of those past their deadline (which fail)."""
        outcome: Outcome = []
        now = time.monotonic()
        leaving = []
        for i, seq in enumerate(self.running):
            if seq.stop_requested:
                leaving.append(i)
            elif seq.expired(now):
                leaving.append(i)
                outcome.append((seq, DeadlineExceeded("the deadline passed during generation")))
        self._release(leaving)
        return outcome

    def _decode_step(self) -> tuple[Outcome, int]:
        """Advances every running sequence by one token; returns the events and the rows run."""
        outcome = self._drop_leaving()
        rows = len(self.running)
        if not rows:
            return outcome, 0
        assert self.state is not None
        tokens = torch.tensor([seq.generated[-1] for seq in self.running], dtype=torch.long)
        try:
            logits = self.instance.backend_instance.decode(self.state, tokens)
        except Exception as exc:
            # The batch's cache is in an unknown state: every running sequence ends with the error.
            failed = self._failed(self.running, exc)
            self.running, self.state = [], None
            return outcome + failed, 0
        outcome += self._advance(self.running, logits)
        self._release([i for i, s in enumerate(self.running) if s.finished])
        return outcome, rows

    def _release(self, rows: Sequence[int]) -> None:
        if rows:
            assert self.state is not None
            self.running = [self.running[i] for i in self.state.release(rows)]

    def _failed(self, seqs: Sequence[_Sequence], exc: Exception) -> Outcome:
        if isinstance(exc, PipeserveError):
            error: PipeserveError = exc
        elif isinstance(exc, InstanceDead):
            self._died = exc
            error = ModelNotReady(f"model {self.engine.label}: the instance died: {exc}")
        else:
            log.exception("model %s failed during a generation step", self.engine.label, exc_info=exc)
            error = BackendError(f"model {self.engine.label} failed during generation: {type(exc).__name__}: {exc}")
        return [(seq, error) for seq in seqs]

    def _advance(self, seqs: Sequence[_Sequence], logits: torch.Tensor) -> Outcome:
        """Picks each sequence's next token from its logits row and turns it into an event."""
        greedy = torch.argmax(logits, dim=-1).tolist() if any(s.plan.chooser.plain_greedy for s in seqs) else None
        outcome: Outcome = []
        for row, seq in enumerate(seqs):
            plan = seq.plan
            assert plan is not None
            chooser = plan.chooser
            try:
                token = greedy[row] if greedy is not None and chooser.plain_greedy else chooser.choose(logits[row])
            except RuntimeError as exc:  # e.g. NaN logits: this sequence ends, its neighbours go on
                seq.finished = True
                outcome.append((seq, BackendError(f"choosing the next token failed: {exc}")))
                continue
            chooser.record(token)
            seq.generated.append(token)
            event = TokenEvent(token_ids=[token])
            if plan.top_logprobs is not None:
                event.logprobs = [self._logprob(logits[row], token, plan)]
            reason = plan.stopping.after_token(token, len(seq.generated), len(plan.prompt_ids) + len(seq.generated))
            event.text, reason = self._text(plan, token, reason)
            if reason is not None:
                seq.finished = True
                event.finish_reason = reason
                event.prompt_tokens = len(plan.prompt_ids)
                event.generated_tokens = len(seq.generated)
                event.time_to_first_token = (seq.first_token_at or seq.arrived) - seq.arrived
            outcome.append((seq, event))
        return outcome

    @staticmethod
    def _text(plan: SequencePlan, token: int, reason: FinishReason | None) -> tuple[str, FinishReason | None]:
        """The token's text delta, cut after a stop sequence (which then ends the sequence)."""
        text = plan.detokenizer
        start = len(text.text)
        text.push(token)
        if reason is not None:
            text.flush()
        cut = plan.stopping.stop_in(text.text, start)
        if cut is not None:
            text.text = text.text[:cut]
            reason = FinishReason.STOP_SEQUENCE
        return text.text[start:], reason

    @staticmethod
    def _logprob(logits: torch.Tensor, token: int, plan: SequencePlan) -> TokenLogprob:
        logprobs = torch.log_softmax(logits, dim=-1)
        top: tuple[TopLogprob, ...] = ()
        if plan.top_logprobs:
            values, ids = torch.topk(logprobs, min(plan.top_logprobs, logprobs.shape[-1]))
            top = tuple(TopLogprob(i, plan.detokenizer.token_text(i), v) for v, i in zip(values.tolist(), ids.tolist()))
        return TokenLogprob(token, float(logprobs[token]), top)


class GenerationEngine:
    """Continuous batching for one model version: one InstanceDecoder per instance."""

    def __init__(self, label: str, group: InstancePool, limits: GenerationLimits, stats: ModelStats,
                 on_instance_dead: Callable[[ModelInstance, InstanceDead], None] | None = None):
        self.label = label
        self.limits = limits
        self.stats = stats
        # Replaces an instance whose backend raised InstanceDead (the model's restart policy).
        self.on_instance_dead = on_instance_dead
        self.closing = False
        self.decoders = [InstanceDecoder(instance, self) for instance in group.instances]

    def start(self) -> None:
        for decoder in self.decoders:
            decoder.start()

    @property
    def active_sequences(self) -> int:
        """Sequences decoding or waiting for a row."""
        return sum(d.load for d in self.decoders)

    def submit(self, make_plan: PlanFactory, deadline: float | None = None,
               buffer_limit: int | None = None) -> SequenceStream:
        """Queues a sequence; its events come through the returned stream. `buffer_limit`: unread
        events before a slow reader's stream ends with RESOURCE_EXHAUSTED (None: unbounded)."""
        if self.closing:
            raise ModelNotReady(f"model {self.label} is unloading; retry on another version or later")
        waiting = sum(len(d.waiting) for d in self.decoders)
        if waiting >= self.limits.max_waiting:
            self.stats.rejected += 1
            raise Overloaded(f"model {self.label} has {waiting} sequences waiting (limit {self.limits.max_waiting}); "
                             "retry with backoff")
        ready = [d for d in self.decoders if d.instance.ready()] or self.decoders
        decoder = min(ready, key=lambda d: d.load)
        holder: list[_Sequence] = []
        stream = SequenceStream(buffer_limit, on_cancel=lambda: decoder.cancel(holder[0]))
        seq = _Sequence(make_plan, deadline, stream)
        holder.append(seq)
        decoder.enqueue(seq)
        self.update_stats()
        return stream

    def deliver(self, outcome: Outcome) -> None:
        """Hands a step's results to the streams (on the event loop)."""
        stats = self.stats
        for seq, result in outcome:
            if isinstance(result, PipeserveError):
                seq.stream.fail(result)
                continue
            if len(seq.generated) == len(result.token_ids):  # the sequence's first token
                ttft = (seq.first_token_at or seq.arrived) - seq.arrived
                stats.time_to_first_token.add(ttft)
                stats.notify("time_to_first_token", ttft)
            stats.generated_tokens += len(result.token_ids)
            if not seq.stream.push(result):
                seq.stop_requested = True  # the reader fell too far behind: the next step drops it
        self.update_stats()

    def record_step(self, rows: int, seconds: float) -> None:
        """A decode step ran `rows` sequences in one forward: the model's executions and batch sizes."""
        stats = self.stats
        stats.executions += 1
        stats.inferences += rows
        stats.batch_sizes[rows] += 1
        stats.compute.add(seconds)
        stats.notify("batch", rows)
        stats.notify("compute_seconds", seconds)

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
