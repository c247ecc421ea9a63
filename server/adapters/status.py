"""Maps pipeserve errors to gRPC status codes, in one place, and logs one line per request.

Every servicer method is wrapped by `unary_rpc` or `stream_rpc`; the servicer must have a `plane`
(the DataPlane), whose gate refuses calls once the server drains and counts those in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from pipeserve.server.dataplane import request_model, request_priority
from pipeserve.server.errors import InvalidArgument, PipeserveError

log = logging.getLogger("pipeserve.requests")


# Status details travel percent-encoded in a trailer that clients cap (8 KiB soft, 16 KiB hard by
# default): a message echoing a huge input (a 100 KB model name) must not turn a clean error into
# a broken stream (RESOURCE_EXHAUSTED "Stream removed"). Encoded, a character takes 1 to 12 bytes.
MAX_DETAILS_WIRE_BYTES = 6000


def details(message: str) -> str:
    """The status message, cut to what fits in MAX_DETAILS_WIRE_BYTES once percent-encoded."""
    if len(message) * 12 <= MAX_DETAILS_WIRE_BYTES:
        return message
    size = 0
    for i, ch in enumerate(message):
        plain = " " <= ch <= "~" and ch != "%"
        size += 1 if plain else 3 * len(ch.encode("utf-8", "surrogatepass"))
        if size > MAX_DETAILS_WIRE_BYTES - 60:
            return f"{message[:i]}... ({len(message) - i} more characters cut)"
    return message


def status_code(error: PipeserveError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def timeout_of(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the client's deadline, or None without one."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e9 else None


# Call metadata that sets a call's scheduling priority: 1 is the most urgent level of the model's
# dynamic_batching.priority_levels; absent or 0, the model's default level.
PRIORITY_METADATA = "pipeserve-priority"


def priority_of(context: grpc.aio.ServicerContext) -> int:
    """The priority the call's metadata asks for (0 when it names none)."""
    for key, value in context.invocation_metadata() or ():
        if key == PRIORITY_METADATA:
            try:
                return int(value)
            except ValueError:
                raise InvalidArgument(PRIORITY_METADATA, f"must be an integer (1 = most urgent), got {value!r}") from None
    return 0


def _log_line(rpc: str, task: str, code: str, started: float) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "rpc=%s task=%s model=%s status=%s duration_ms=%.3f",
            rpc, task or "-", request_model.get() or "-", code, (time.perf_counter() - started) * 1e3,
        )


class _CallScope:
    """One call's bookkeeping around the servicer's code: the drain gate, the mapping of errors
    to statuses (typed errors keep their code, anything else is INTERNAL), and the log line."""

    __slots__ = ("rpc", "task", "context", "gate", "started")

    def __init__(self, servicer: Any, rpc: str, task: str, context: grpc.aio.ServicerContext):
        self.rpc, self.task, self.context = rpc, task, context
        self.gate = servicer.plane.gate

    async def __aenter__(self) -> None:
        self.started = time.perf_counter()
        request_model.set("")
        try:
            self.gate.enter()
        except PipeserveError as exc:
            _log_line(self.rpc, self.task, exc.code, self.started)
            if self.gate.closing:
                await self.gate.hold_refusal()  # see CallGate.REFUSAL_HOLD_S
            await self.context.abort(status_code(exc), details(exc.message))
        try:
            request_priority.set(priority_of(self.context))
        except PipeserveError as exc:
            await self.__aexit__(type(exc), exc, None)

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        code = "OK"
        try:
            if exc is None:
                return False
            if isinstance(exc, PipeserveError):
                code = exc.code
                await self.context.abort(status_code(exc), details(exc.message))
            elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                code = "CANCELLED"
            elif isinstance(exc, grpc.aio.AbortError):
                code = "ABORTED_BY_HANDLER"
            elif isinstance(exc, Exception):
                code = "INTERNAL"
                log.error("rpc %s failed", self.rpc, exc_info=exc)
                await self.context.abort(grpc.StatusCode.INTERNAL, details(f"internal error: {type(exc).__name__}: {exc}"))
            return False
        finally:
            self.gate.exit()
            _log_line(self.rpc, self.task, code, self.started)


def unary_rpc(task: str = "") -> Callable:
    """Wraps a unary servicer method in a _CallScope."""

    def decorate(method: Callable) -> Callable:
        rpc = method.__name__

        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _CallScope(self, rpc, task, context):
                return await method(self, request, context)

        return wrapper

    return decorate


def stream_rpc(task: str = "") -> Callable:
    """Wraps a server-streaming servicer method (an async generator) in a _CallScope."""

    def decorate(method: Callable) -> Callable:
        rpc = method.__name__

        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _CallScope(self, rpc, task, context):
                async for message in method(self, request, context):
                    yield message

        return wrapper

    return decorate
