"""The generation runtime: each input's sequences run on the model's continuous batching engine, or,
when their parameters need what the engine cannot do, as whole sequences.

The task turns a prompt into a `SequencePlan` (tokenized, in the worker thread, at admission) and
the outcomes back into transformers' results; the engine runs the steps. A unary call waits for
every sequence of its inputs; a stream yields one sequence's events as they come.

Beam search (and the rarer logits processors, see tasks/generation_params.py) cannot run a token
at a time among other rows: the task says so (`GenerativeTask.whole_sequence`) and such a
request's inputs go through the version's dynamic batcher instead, as summarization's do: queued
with their deadline and priority, run by `task.run_batch` (one `Instance.generate` per input) on
an instance's worker thread, between the engine's steps there, with the same error, instance-death
and statistics handling (`scheduling/execution.py`). The outcomes are shaped as the engine's are;
a stream of such a request gets its whole sequence as one message.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pipeserve.server.generation.engine import GenerationEngine
from pipeserve.server.generation.outputs import SequenceOutcome, TokenEvent
from pipeserve.server.repository.model_settings import ModelSettings
from pipeserve.server.runtime.batched import BatchedRuntime
from pipeserve.server.runtime.counting import counted
from pipeserve.server.scheduling.batcher import OnInstanceDead
from pipeserve.server.scheduling.instances import InstancePool
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.tasks.base import GenerativeTask, TaskParams


class GenerationRuntime:
    def __init__(self, label: str, task: GenerativeTask, pool: InstancePool, settings: ModelSettings,
                 stats: ModelStats, on_instance_dead: OnInstanceDead | None):
        self.task = task
        self.stats = stats
        self.limits = settings.generation
        self.engine = GenerationEngine(label, pool, self.limits, stats, on_instance_dead=on_instance_dead)
        # Whole-sequence requests: the batcher hands their inputs to task.run_batch.
        self.whole = BatchedRuntime(label, task, pool, settings, stats, on_instance_dead)  # type: ignore[arg-type]

    def start(self) -> None:
        self.engine.start()
        self.whole.start()

    async def submit(self, inputs: Sequence[Any], params: TaskParams, deadline: float | None = None,
                     priority: int = 0) -> list[Any]:
        """Every input's sequences, run together on the engine (or whole); one result per input."""
        if self.task.whole_sequence(params):
            outcomes = await self.whole.submit(inputs, params, deadline, priority)
            return self.task.sequence_results(inputs, params, outcomes)
        with counted(self.stats):
            plans = self.task.sequence_plans(inputs, params)
            sequences = []
            waits: list[asyncio.Future] = []
            try:
                for per_input in plans:
                    sequences.append([self.engine.submit(make_plan, deadline) for make_plan in per_input])
                waits = [asyncio.ensure_future(s.outcome()) for per_input in sequences for s in per_input]
                outcomes = await asyncio.gather(*waits)
            except BaseException:
                # One sequence failed (or the call was cancelled): the others stop, and their waits
                # end here rather than run on unawaited.
                for per_input in sequences:
                    for sequence in per_input:
                        sequence.cancel()
                for wait in waits:
                    wait.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                raise
            grouped, start = [], 0
            for per_input in plans:
                grouped.append(outcomes[start:start + len(per_input)])
                start += len(per_input)
            return self.task.sequence_results(inputs, params, grouped)

    async def stream(self, item: Any, params: TaskParams, deadline: float | None = None) -> AsyncIterator[Any]:
        """One input's sequence; its events as they come (those that piled up while the reader was
        busy arrive merged). Closing the iterator stops the sequence."""
        if self.task.whole_sequence(params):
            self.task.stream_plan(item, params)  # the same checks as a stream on the engine
            (outcomes,) = await self.whole.submit([item], params, deadline)
            yield _whole_event(outcomes[0])
            return
        make_plan = self.task.stream_plan(item, params)
        sequence = self.engine.submit(make_plan, deadline, buffer_limit=self.limits.max_stream_buffer)
        try:
            with counted(self.stats):
                async for events in sequence.batches():
                    yield events
        finally:
            sequence.cancel()  # a no-op once the sequence has ended

    def wake(self) -> None:
        """The engine's decoders notice a replaced instance at their next step by themselves; the
        whole-sequence batcher is told."""
        self.whole.wake()

    async def drain(self) -> None:
        """Sequences run until they finish (or the engine's grace at close is over)."""
        await self.whole.drain()

    async def close(self) -> None:
        await self.whole.close()
        await self.engine.close()


def _whole_event(outcome: SequenceOutcome) -> TokenEvent:
    """A whole sequence as a stream's one (and last) message."""
    return TokenEvent(token_ids=list(outcome.token_ids), text=outcome.text, logprobs=list(outcome.logprobs),
                      finish_reason=outcome.finish_reason, prompt_tokens=outcome.prompt_tokens,
                      generated_tokens=outcome.generated_tokens, time_to_first_token=outcome.time_to_first_token)
