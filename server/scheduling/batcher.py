"""The dynamic batcher: one per model version, merging inputs from many requests into batches.

Inputs wait in bounded queues, one per priority level. Whenever an instance has room, the batcher
takes the oldest input of the most urgent level and the queued inputs that can share its batch
(same batch key), and hands them to the instance's worker thread; the event loop only moves items.

When to dispatch (Triton's rules): at once when a full batch (or, with preferred sizes, a batch of
a preferred size) can be formed; otherwise the oldest input may wait up to max_queue_delay for
company. It waits only where company is plausible: after a run of requests that each arrived
alone (nothing else in flight, one client calling in turn) waiting could only add latency.

What to dispatch: among the candidates, inputs of similar size, so that padding stays small. How
many is learned per model (cost.py): a model whose batches cost mostly a fixed overhead gets full
batches, one whose cost grows with padded length gets fewer inputs of closer length. The oldest
input is always in the batch, so none starves.

A full queue refuses a request at once (RESOURCE_EXHAUSTED); a request withdrawn (cancelled, past
its deadline, or failed) leaves the queue at once; an input whose deadline passed is never run.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pipeserve.backends.base import InstanceDead
from pipeserve.server.errors import DeadlineExceeded, InvalidArgument, ModelNotReady, Overloaded, PipeserveError
from pipeserve.server.scheduling.cost import BatchCostModel
from pipeserve.server.scheduling.execution import BATCH, Execution, OnInstanceDead
from pipeserve.server.scheduling.instances import InstancePool, ModelInstance
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.scheduling.work import Request, WorkItem

# Candidates considered for one batch, as a multiple of its size: room to group by length.
GROUPING_WINDOW = 4
# Requests in a row that arrived with nothing else in flight before the queue delay is skipped.
SOLO_STREAK = 4

Execute = Callable[[ModelInstance, Sequence[WorkItem]], list[Any]]


class DynamicBatcher:
    def __init__(
        self,
        label: str,
        group: InstancePool,
        execute: Execute,
        stats: ModelStats,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        priority_levels: int = 0,
        default_priority: int = 0,
        merge_requests: bool = True,
        on_instance_dead: OnInstanceDead | None = None,
    ):
        self.label = label
        self.group = group
        self.execute = execute
        self.stats = stats
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = sorted(set(preferred_batch_sizes))
        self.max_queue_size = max_queue_size
        # Without dynamic_batching in the config, each request's inputs run on their own.
        self.merge_requests = merge_requests
        self.priority_levels = priority_levels
        self.queues: list[deque[WorkItem]] = [deque() for _ in range(max(1, priority_levels))]
        # Without a configured default, unprioritised work goes to the middle level, so that
        # clients can ask for both more and less urgency.
        self.default_priority = default_priority or (len(self.queues) + 1) // 2
        self.cost = BatchCostModel()
        self.on_instance_dead = on_instance_dead
        # Failures, dead instances and execution counts, as the generation engine has them too.
        self.execution = Execution(label, stats, on_instance_dead, BATCH)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poke_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._solo_streak = 0
        self._running_batches = 0
        self._closed = False
        self._drained: asyncio.Event | None = None

    # -- the caller's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    @property
    def queued(self) -> int:
        return self.stats.queued

    def level_of(self, priority: int) -> int:
        """The queue for a request's priority (1 = most urgent, 0 = the model's default)."""
        if self.priority_levels == 0:
            return 0  # priorities are off for this model: one queue, first come first served
        if not 0 <= priority <= self.priority_levels:
            raise InvalidArgument(
                "priority", f"must be in 1..{self.priority_levels} (1 most urgent) or 0 for the default "
                f"({self.default_priority}), got {priority}")
        return (priority or self.default_priority) - 1

    def submit(self, request: Request, items: Sequence[WorkItem]) -> None:
        """Queues a request's inputs, all or none: a full queue refuses the whole request at once."""
        if self._closed:
            raise ModelNotReady(f"model {self.label} is unloading; retry on another version or later")
        stats = self.stats
        if stats.queued + len(items) > self.max_queue_size:
            stats.rejected += 1
            if len(items) > self.max_queue_size:
                raise Overloaded(f"the request has {len(items)} inputs but model {self.label} queues at most "
                                 f"{self.max_queue_size}; split it")
            raise Overloaded(f"model {self.label} has {stats.queued} inputs queued (limit {self.max_queue_size}); "
                             "retry with backoff")
        request.level = level = self.level_of(request.priority)
        # A request that arrives while none is in flight had nobody to share a batch with.
        self._solo_streak = self._solo_streak + 1 if stats.in_flight == 0 else 0
        now = time.monotonic()
        queue = self.queues[level]
        for item in items:
            item.enqueued_at = now
            queue.append(item)
        stats.queued += len(items)
        if self._solo_streak >= SOLO_STREAK and not self._poke_pending:
            self._schedule()  # alone: nothing to merge with, so no loop iteration is spent waiting
        else:
            self._poke()

    def withdraw(self, request: Request, items: Sequence[WorkItem]) -> None:
        """Takes a request's inputs that are still queued out of the queue, at once."""
        queue = self.queues[request.level]
        if not queue:
            return
        before = len(queue)
        kept = [it for it in queue if it.request is not request]
        if len(kept) != before:
            queue.clear()
            queue.extend(kept)
            self.stats.queued -= before - len(kept)
            self._maybe_drained()

    async def drain(self) -> None:
        """Stops taking work and returns once queued and running batches have finished."""
        self._closed = True
        self._drained = asyncio.Event()
        self._poke()
        self._maybe_drained()
        await self._drained.wait()
        if self._timer is not None:
            self._timer.cancel()

    # -- deciding when and what to run ------------------------------------------------------------

    def wake(self) -> None:
        """Something changed outside the batcher (an instance came back or died): schedule again."""
        self._poke()

    def _poke(self) -> None:
        """Schedules a pass at the end of this loop iteration, so that inputs arriving together
        are considered together."""
        if not self._poke_pending and self._loop is not None:
            self._poke_pending = True
            self._loop.call_soon(self._schedule)

    def _on_timer(self) -> None:
        self._timer = None
        self._schedule()

    def _arm_timer(self, at: float) -> None:
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer_at = at
        self._timer = self._loop.call_later(max(0.0, at - time.monotonic()), self._on_timer)

    def _schedule(self) -> None:
        self._poke_pending = False
        while self.stats.queued:
            instance = self.group.pick()
            if instance is None:
                if not self._running_batches and not self.group.may_serve():
                    self._fail_all_queued(ModelNotReady(f"model {self.label} has no ready instance; retry later"))
                return  # a finishing batch or a returning instance schedules again
            now = time.monotonic()
            head = self._head(now)
            if head is None:
                break
            wait_until = self._wait_until(head)
            if wait_until > now:
                self._arm_timer(wait_until)
                return
            batch = self._take_batch(head, now)
            if batch:
                self._dispatch(instance, batch)
        self._maybe_drained()

    def _wait_until(self, head: WorkItem) -> float:
        """When to dispatch a batch for `head`; at or before now means at once."""
        if self.max_queue_delay_s <= 0 or self._closed or not self.merge_requests:
            return 0.0
        available = self.stats.queued
        if available >= self.max_batch_size or (self.preferred and available >= self.preferred[0]):
            return 0.0
        if self._solo_streak >= SOLO_STREAK:
            return 0.0
        return head.enqueued_at + self.max_queue_delay_s

    def _head(self, now: float) -> WorkItem | None:
        """The oldest runnable input of the most urgent level; drops answered and expired ones."""
        for queue in self.queues:
            while queue:
                item = queue[0]
                if item.request.done:
                    queue.popleft()
                    self.stats.queued -= 1
                elif item.request.expired(now):
                    queue.popleft()
                    self.stats.queued -= 1
                    item.request.fail(DeadlineExceeded("the deadline passed while the request was queued"))
                else:
                    return item
        return None

    def _target_size(self, available: int) -> int:
        if available >= self.max_batch_size:
            return self.max_batch_size
        fitting = [p for p in self.preferred if p <= available]
        return fitting[-1] if fitting else available

    def _take_batch(self, head: WorkItem, now: float) -> list[WorkItem]:
        """Removes and returns the next batch: `head` and queued inputs that can share its batch."""
        key = head.batch_key
        limit = self.max_batch_size * GROUPING_WINDOW
        candidates: list[WorkItem] = []
        urgent = 0
        for level in range(head.request.level, len(self.queues)):
            if level > head.request.level:
                if len(candidates) >= self.max_batch_size:
                    break
                # Less urgent inputs only fill a batch that the more urgent ones cannot.
                limit = self.max_batch_size
            for item in self.queues[level]:
                request = item.request
                if request.done or request.expired(now):
                    continue  # _sweep below fails or drops it
                if item.batch_key == key and (self.merge_requests or request is head.request):
                    candidates.append(item)
                    if len(candidates) >= limit:
                        break
            urgent = urgent or len(candidates)
        target = self._target_size(len(candidates))
        # Preferred sizes are the user's choice of batch size; grouping then only picks the inputs.
        # A batch filled from a less urgent level takes them all, so that no urgent input is left.
        learned = self.cost.coefficients is not None and not self.preferred and urgent == len(candidates)
        if len(candidates) > target or (learned and len(candidates) > 1):
            candidates.sort(key=_size)
            start, n = self.cost.choose([it.size for it in candidates], candidates.index(head), target,
                                        fixed=not learned)
            batch = candidates[start : start + n]
        else:
            batch = candidates
        self._sweep(batch, now)
        return batch

    def _sweep(self, taken: list[WorkItem], now: float) -> None:
        """Removes the taken inputs from their queues, with answered or expired ones met on the way."""
        taken_ids = {id(it) for it in taken}
        removed = 0
        for queue in self.queues:
            if not queue:
                continue
            kept = []
            for item in queue:
                request = item.request
                if id(item) in taken_ids or request.done:
                    continue
                if request.expired(now):
                    request.fail(DeadlineExceeded("the deadline passed while the request was queued"))
                    continue
                kept.append(item)
            if len(kept) != len(queue):
                removed += len(queue) - len(kept)
                queue.clear()
                queue.extend(kept)
        self.stats.queued -= removed

    def _fail_all_queued(self, error: PipeserveError) -> None:
        for queue in self.queues:
            for item in queue:
                item.request.fail(error)
            queue.clear()
        self.stats.queued = 0

    def _maybe_drained(self) -> None:
        if self._drained is not None and not self.stats.queued and not self._running_batches:
            self._drained.set()

    # -- running a batch ----------------------------------------------------------------------

    def _dispatch(self, instance: ModelInstance, batch: list[WorkItem]) -> None:
        threads = self.group.threads_for(instance)  # before this batch counts as the instance's work
        instance.outstanding += 1
        self._running_batches += 1
        stats = self.stats
        started = time.monotonic()
        waited = 0.0
        for item in batch:
            waited += started - item.enqueued_at
        stats.queue.count += len(batch)
        stats.queue.total_ns += int(waited * 1e9)
        if stats.listeners:
            for item in batch:
                stats.notify("queue_seconds", started - item.enqueued_at)
        assert self._loop is not None
        instance.worker.post(
            self._loop,
            lambda: self._run_batch(instance, batch, threads),
            lambda outcome: self._finish(instance, batch, outcome),
        )

    def _run_batch(self, instance: ModelInstance, batch: list[WorkItem],
                   threads: int) -> tuple[list[Any], float, InstanceDead | None]:
        """In the instance's worker thread: the task's whole batch step, timed."""
        started = time.perf_counter()
        died = None
        try:
            instance.use_threads(threads)
            results = self.execute(instance, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"the task returned {len(results)} results for {len(batch)} inputs")
        except Exception as exc:  # a model bug must fail its batch, never the server
            failure = self.execution.failure(exc, instance, f"a batch of {len(batch)}")
            results, died = [failure.error] * len(batch), failure.died
        return results, time.perf_counter() - started, died

    def _finish(self, instance: ModelInstance, batch: list[WorkItem],
                outcome: tuple[list[Any], float, InstanceDead | None]) -> None:
        instance.outstanding -= 1
        self._running_batches -= 1
        results, seconds, died = outcome
        if died is not None:
            self.execution.instance_died(instance, died)
        n = len(batch)
        self.execution.executed(n, seconds)
        if died is None:
            self.cost.observe(n, max(it.size for it in batch), seconds)
        for item, result in zip(batch, results):
            item.request.deliver(item.index, result)
        self._schedule()


def _size(item: WorkItem) -> int:
    return item.size

