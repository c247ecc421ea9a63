"""The batched runtime: a request's inputs go through the model's dynamic batcher, and each batch
runs the task's four steps on an instance (`Task.run_batch`, in the instance's worker thread)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from pipeserve.server.errors import DeadlineExceeded, InvalidArgument, Unimplemented
from pipeserve.server.repository.model_settings import ModelSettings
from pipeserve.server.runtime.counting import counted
from pipeserve.server.scheduling.batcher import DynamicBatcher, OnInstanceDead
from pipeserve.server.scheduling.instances import InstancePool, ModelInstance
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.scheduling.work import Request, WorkItem
from pipeserve.server.tasks.base import Task, TaskParams


class BatchedRuntime:
    def __init__(self, label: str, task: Task, pool: InstancePool, settings: ModelSettings, stats: ModelStats,
                 on_instance_dead: OnInstanceDead | None):
        self.label = label
        self.task = task
        self.stats = stats
        batching = settings.batching
        self.batcher = DynamicBatcher(
            label,
            pool,
            self._execute,
            stats,
            max_batch_size=settings.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_s,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_queue_size=batching.max_queue_size,
            priority_levels=batching.priority_levels,
            default_priority=batching.default_priority_level,
            merge_requests=batching.enabled,
            on_instance_dead=on_instance_dead,
        )

    def start(self) -> None:
        self.batcher.start()

    def _execute(self, instance: ModelInstance, batch: Sequence[WorkItem]) -> list[Any]:
        return self.task.run_batch(instance.backend_instance, [it.payload for it in batch], [it.params for it in batch])

    async def submit(self, inputs: Sequence[Any], params: TaskParams, deadline: float | None = None,
                     priority: int = 0) -> list[Any]:
        """Runs a request's inputs through the batcher; returns one result per input.

        `deadline` is a time.monotonic() instant: inputs still queued then are dropped unrun and
        the call fails with DEADLINE_EXCEEDED. Cancelling the call withdraws its queued inputs.
        """
        loop = asyncio.get_running_loop()
        request = Request(loop.create_future(), len(inputs), deadline, priority)
        key, size = params.batch_key, self.task.size
        items = [WorkItem(request, i, x, params, key, size(x)) for i, x in enumerate(inputs)]
        self.batcher.submit(request, items)
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), request.fail,
                                    DeadlineExceeded("the deadline passed before the model answered"))
        with counted(self.stats):
            try:
                return await request.future
            except BaseException as exc:
                # Failed, past its deadline, or cancelled: its other inputs leave the queue now.
                self.batcher.withdraw(request, items)
                if isinstance(exc, InvalidArgument) and request.failed_index is not None:
                    raise exc.for_input(request.failed_index) from None
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    def stream(self, item: Any, params: TaskParams, deadline: float | None = None):
        raise Unimplemented(f"model {self.label} serves {self.task.name}, which does not stream")

    def wake(self) -> None:
        """An instance came back (or died for good): queued work may move."""
        self.batcher.wake()

    async def drain(self) -> None:
        """Finishes queued and running work."""
        await self.batcher.drain()

    async def close(self) -> None:
        await self.batcher.drain()
