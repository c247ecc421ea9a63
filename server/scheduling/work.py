"""A unit of work as the scheduler sees it: opaque payload, size, batch key, deadline, priority."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class WorkItem:
    """One input of a request, waiting for a batch. The scheduler never looks inside `payload`."""

    payload: Any
    params: Any
    batch_key: Hashable
    size: int
    future: asyncio.Future
    # time.monotonic() after which the item is dropped unrun; None: no deadline.
    deadline: float | None = None
    priority: int = 0
    enqueued_at: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def abandoned(self) -> bool:
        """Cancelled (the client went away) or already answered: skip it."""
        return self.future.done()
