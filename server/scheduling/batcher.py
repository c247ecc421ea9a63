"""The dynamic batcher: one queue per model version, merging inputs from many requests into batches.

Inputs wait in bounded priority queues. When an instance is free, the batcher takes the oldest
input's batch key, gathers the queued inputs that share it, and (when there are more than fit)
picks the run of similar sizes around the oldest one, so that padding waste stays small and no
input starves. The batch runs in the instance's worker thread; the event loop only moves items.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from pipeserve.server.errors import BackendError, DeadlineExceeded, ModelNotReady, Overloaded, PipeserveError
from pipeserve.server.scheduling.instances import InstanceGroup, ModelInstance
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.scheduling.work import WorkItem

log = logging.getLogger("pipeserve.scheduler")

# How many queued items past the batch size are considered when grouping by length.
_GROUPING_WINDOW = 4

Execute = Callable[[ModelInstance, Sequence[WorkItem]], list[Any]]


class DynamicBatcher:
    def __init__(
        self,
        label: str,
        group: InstanceGroup,
        execute: Execute,
        stats: ModelStats,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_size: int = 1024,
        priority_levels: int = 0,
        default_priority: int = 0,
    ):
        self.label = label
        self.group = group
        self.execute = execute
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.preferred = sorted(set(preferred_batch_sizes))
        self.max_queue_size = max_queue_size
        self.queues: list[deque[WorkItem]] = [deque() for _ in range(max(1, priority_levels))]
        # Without a configured default, unprioritised work goes to the middle level, so that
        # clients can ask for both more and less urgency.
        self.default_priority = default_priority or (len(self.queues) + 1) // 2
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closed = False
        self._running_batches = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- the caller's side ------------------------------------------------------------------------

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.label}")

    @property
    def queued(self) -> int:
        return self.stats.queued

    def submit(self, items: Sequence[WorkItem]) -> None:
        """Queues a request's inputs, all or none: a full queue refuses the whole request at once."""
        if self._closed:
            raise ModelNotReady(f"model {self.label} is unloading; retry on another version or later")
        if self.stats.queued + len(items) > self.max_queue_size:
            self.stats.rejected += 1
            raise Overloaded(
                f"model {self.label} has {self.stats.queued} inputs queued (limit {self.max_queue_size}); retry with backoff"
            )
        for item in items:
            queue = self.queues[self._level(item.priority)]
            queue.append(item)
            item.future.add_done_callback(lambda fut, it=item, q=queue: self._on_done(fut, it, q))
        self.stats.queued += len(items)
        self._wakeup.set()

    def _level(self, priority: int) -> int:
        """Queue index for a priority (1 = highest); 0 means the default priority."""
        return min(max((priority or self.default_priority) - 1, 0), len(self.queues) - 1)

    def _on_done(self, fut: asyncio.Future, item: WorkItem, queue: deque[WorkItem]) -> None:
        # A cancelled call leaves the queue at once, so it neither runs nor holds a slot.
        if fut.cancelled():
            try:
                queue.remove(item)
            except ValueError:
                return  # already taken into a batch
            self.stats.queued -= 1

    async def drain(self) -> None:
        """Stops taking work, lets queued and running batches finish."""
        self._closed = True
        while self.stats.queued or self._running_batches:
            self._idle.clear()
            self._wakeup.set()
            await self._idle.wait()
        if self._runner:
            self._runner.cancel()

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self.stats.queued == 0:
                self._idle_if_done()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            instance = self.group.pick()
            if instance is None:
                if not self.group.any_ready():
                    self._fail_all_queued(ModelNotReady(f"model {self.label} has no ready instance"))
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait = self._time_to_wait()
            if wait > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                continue
            batch = self._take_batch()
            if batch:
                self._dispatch(instance, batch)

    def _idle_if_done(self) -> None:
        if self._running_batches == 0:
            self._idle.set()

    def _time_to_wait(self) -> float:
        """Seconds to keep waiting for a fuller batch; 0 to dispatch now."""
        if self.max_queue_delay_s <= 0 or self._closed:
            return 0.0
        queued = self.stats.queued
        if queued >= self.max_batch_size or (self.preferred and queued >= self.preferred[-1]):
            return 0.0
        oldest = min(q[0].enqueued_at for q in self.queues if q)
        return max(0.0, oldest + self.max_queue_delay_s - time.monotonic())

    def _take_batch(self) -> list[WorkItem]:
        now = time.monotonic()
        for queue in self.queues:
            self._purge(queue, now)
            if not queue:
                continue
            head = queue[0]
            limit = self.max_batch_size * _GROUPING_WINDOW
            candidates = []
            for item in queue:
                if item.batch_key == head.batch_key:
                    candidates.append(item)
                    if len(candidates) >= limit:
                        break
            batch = candidates if len(candidates) <= self.max_batch_size else self._similar_sizes(candidates, head)
            chosen = set(map(id, batch))
            remaining = [it for it in queue if id(it) not in chosen]
            queue.clear()
            queue.extend(remaining)
            self.stats.queued -= len(batch)
            return batch
        return []

    def _similar_sizes(self, candidates: list[WorkItem], head: WorkItem) -> list[WorkItem]:
        """The max_batch_size items of closest size that include the oldest item (so none starves)."""
        ordered = sorted(candidates, key=lambda it: it.size)
        at = ordered.index(head)
        n = self.max_batch_size
        best_start, best_spread = 0, None
        for start in range(max(0, at - n + 1), min(at, len(ordered) - n) + 1):
            spread = ordered[start + n - 1].size - ordered[start].size
            if best_spread is None or spread < best_spread:
                best_start, best_spread = start, spread
        return ordered[best_start : best_start + n]

    def _purge(self, queue: deque[WorkItem], now: float) -> None:
        """Drops answered items and fails those whose deadline passed, before any compute."""
        kept = [it for it in queue if not it.abandoned]
        expired = [it for it in kept if it.expired(now)]
        if len(kept) != len(queue) or expired:
            for it in expired:
                it.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                self.stats.failure += 1
            self.stats.queued -= len(queue) - len(kept) + len(expired)
            queue.clear()
            queue.extend(it for it in kept if not it.expired(now))

    def _fail_all_queued(self, error: PipeserveError) -> None:
        for queue in self.queues:
            for it in queue:
                if not it.future.done():
                    it.future.set_exception(error)
            queue.clear()
        self.stats.queued = 0

    # -- running a batch ----------------------------------------------------------------------

    def _dispatch(self, instance: ModelInstance, batch: list[WorkItem]) -> None:
        instance.outstanding += 1
        self._running_batches += 1
        started = time.monotonic()
        for it in batch:
            self.stats.queue.add(started - it.enqueued_at)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(instance.executor, self._execute_timed, instance, batch)
        fut.add_done_callback(lambda f: self._finish(instance, batch, f))

    def _execute_timed(self, instance: ModelInstance, batch: list[WorkItem]) -> tuple[list[Any], float]:
        started = time.perf_counter()
        try:
            results = self.execute(instance, batch)
        except PipeserveError as exc:
            results = [exc] * len(batch)
        except Exception as exc:  # a model bug must fail its batch, never the server
            log.exception("model %s failed on a batch of %d", self.label, len(batch))
            error = BackendError(f"model {self.label} failed while running the batch: {type(exc).__name__}: {exc}")
            results = [error] * len(batch)
        return results, time.perf_counter() - started

    def _finish(self, instance: ModelInstance, batch: list[WorkItem], fut: asyncio.Future) -> None:
        instance.outstanding -= 1
        self._running_batches -= 1
        results, seconds = fut.result()
        self.stats.executions += 1
        self.stats.inferences += len(batch)
        self.stats.batch_sizes[len(batch)] += 1
        self.stats.compute.add(seconds)
        self.stats.notify("batch", len(batch))
        self.stats.notify("compute_seconds", seconds)
        for item, result in zip(batch, results):
            if item.future.done():
                continue
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
        self._wakeup.set()
