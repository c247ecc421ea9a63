"""Work as the scheduler sees it: a request of one or more inputs, each input an opaque WorkItem.

The scheduler never looks inside a payload; it sees a size (for grouping inputs of similar length),
a batch key (inputs batch together only when their keys are equal), a deadline and a priority.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any


class Request:
    """One call's inputs. Its future resolves to one result per input, in order, or to the first
    error any of its inputs met (the other inputs are then withdrawn by the caller)."""

    __slots__ = ("future", "results", "pending", "deadline", "priority", "level", "failed_index")

    def __init__(self, future: asyncio.Future, count: int, deadline: float | None = None, priority: int = 0):
        self.future = future
        self.results: list[Any] = [None] * count
        self.pending = count
        # time.monotonic() after which queued inputs are dropped unrun; None: no deadline.
        self.deadline = deadline
        # As the caller asked (0: the model's default); `level` is the queue the batcher chose.
        self.priority = priority
        self.level = 0
        # Which input's error failed the request (for messages that name the input).
        self.failed_index: int | None = None

    @property
    def done(self) -> bool:
        """Answered, failed or cancelled: its queued inputs must not run."""
        return self.future.done()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def deliver(self, index: int, result: Any) -> None:
        """Records one input's result (or exception); resolves the request when it is complete."""
        if self.future.done():
            return
        if isinstance(result, BaseException):
            self.failed_index = index
            self.future.set_exception(result)
            return
        self.results[index] = result
        self.pending -= 1
        if self.pending == 0:
            self.future.set_result(self.results)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class WorkItem:
    """One input of a request, waiting for a batch. The scheduler never looks inside `payload`."""

    __slots__ = ("request", "index", "payload", "params", "batch_key", "size", "enqueued_at")

    def __init__(self, request: Request, index: int, payload: Any, params: Any, batch_key: Hashable, size: int):
        self.request = request
        self.index = index
        self.payload = payload
        self.params = params
        self.batch_key = batch_key
        self.size = size
        self.enqueued_at = 0.0
