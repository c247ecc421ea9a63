"""The data plane: the one path every protocol adapter takes to run a task on a model.

Adapters (typed task services, KServe v2) turn their messages into Python inputs and parameters
and call `DataPlane.infer`; it resolves the model, validates, and hands the work to the model's
scheduler. Like MLServer's DataPlane, it knows no protocol.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pipeserve.server.errors import InvalidArgument, ShuttingDown
from pipeserve.server.model_registry import ModelRegistry
from pipeserve.server.served_model import ServedModel

# What the request log line reports about the model that answered (set per call).
request_model: contextvars.ContextVar[str] = contextvars.ContextVar("request_model", default="")
# The call's scheduling priority (1 = most urgent; 0 = the model's default), set by the adapters
# from the call's metadata so that every service honours it without a field of its own.
request_priority: contextvars.ContextVar[int] = contextvars.ContextVar("request_priority", default=0)

MAX_INPUTS_PER_REQUEST = 4096


class CallGate:
    """Counts calls in flight and refuses new ones once draining starts (SIGTERM)."""

    # Once the calls in flight have finished and the listener is about to close (`closing`), a
    # refused call is held (at most this long) and answered UNAVAILABLE just before the close. A
    # client that resent at once after each refusal would otherwise keep calls arriving until
    # the very end, and those that reached gRPC core but no handler when the listener closes are
    # cancelled by core (CANCELLED, which no client retries: the request is lost) instead of
    # refused. Held, such a client has nothing new in flight at the close. While calls are still
    # in flight, refusals go out at once.
    REFUSAL_HOLD_S = 1.0

    def __init__(self) -> None:
        self.draining = False
        # Set once the drain is over and the listener closes next (see REFUSAL_HOLD_S).
        self.closing = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._refusals_released = asyncio.Event()

    def enter(self) -> None:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()

    async def hold_refusal(self) -> None:
        """Waits (a refused call, while closing) until `release_refusals` or REFUSAL_HOLD_S."""
        try:
            await asyncio.wait_for(self._refusals_released.wait(), self.REFUSAL_HOLD_S)
        except TimeoutError:
            pass

    def release_refusals(self) -> None:
        """The listener closes next: held refusals go out now."""
        self._refusals_released.set()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuses new calls, waits for those in flight; False if the timeout came first."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


class DataPlane:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.gate = CallGate()

    async def infer(
        self,
        task: str,
        inputs: Sequence[Any],
        params: dict[str, Any],
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
        priority: int = 0,
    ) -> tuple[ServedModel, list[Any]]:
        """Runs `inputs` through `task` on the named (or default) model; one result per input."""
        served = self.registry.resolve(task, model, version)
        request_model.set(served.label)
        if not inputs:
            raise InvalidArgument("inputs", "must hold at least one input")
        if len(inputs) > MAX_INPUTS_PER_REQUEST:
            raise InvalidArgument("inputs", f"holds {len(inputs)} inputs; at most {MAX_INPUTS_PER_REQUEST} per request")
        task_params = served.task.sanitize(params)
        for i, item in enumerate(inputs):
            served.task.check_input(i, item)
        deadline = time.monotonic() + timeout if timeout is not None else None
        return served, await served.submit(inputs, task_params, deadline, priority or request_priority.get())

    def stream(
        self,
        task: str,
        item: Any,
        params: dict[str, Any],
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
    ) -> tuple[ServedModel, AsyncIterator[Any]]:
        """Runs one input of a streaming task (text-generation); its events come as they are made.
        Close the iterator (`contextlib.aclosing`) to stop the work early."""
        served = self.registry.resolve(task, model, version)
        request_model.set(served.label)
        task_params = served.task.sanitize(params)
        served.task.check_input(0, item)
        deadline = time.monotonic() + timeout if timeout is not None else None
        return served, served.stream(item, task_params, deadline)
