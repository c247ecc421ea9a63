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

from pipeserve.server.dataplane import request_model
from pipeserve.server.errors import PipeserveError

log = logging.getLogger("pipeserve.requests")


def status_code(error: PipeserveError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def timeout_of(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the client's deadline, or None without one."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e9 else None


def _log_line(rpc: str, task: str, code: str, started: float) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "rpc=%s task=%s model=%s status=%s duration_ms=%.3f",
            rpc, task or "-", request_model.get() or "-", code, (time.perf_counter() - started) * 1e3,
        )


def unary_rpc(task: str = "") -> Callable:
    """Wraps a unary servicer method: typed errors become statuses, anything else INTERNAL."""

    def decorate(method: Callable) -> Callable:
        rpc = method.__name__

        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_model.set("")
            code = "OK"
            gate = self.plane.gate
            try:
                gate.enter()
            except PipeserveError as exc:
                _log_line(rpc, task, exc.code, started)
                await context.abort(status_code(exc), exc.message)
            try:
                return await method(self, request, context)
            except PipeserveError as exc:
                code = exc.code
                await context.abort(status_code(exc), exc.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    code = "ABORTED_BY_HANDLER"
                    raise
                code = "INTERNAL"
                log.exception("rpc %s failed", rpc)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                gate.exit()
                _log_line(rpc, task, code, started)

        return wrapper

    return decorate


def stream_rpc(task: str = "") -> Callable:
    """Wraps a server-streaming servicer method (an async generator) like `unary_rpc`."""

    def decorate(method: Callable) -> Callable:
        rpc = method.__name__

        @functools.wraps(method)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            request_model.set("")
            code = "OK"
            gate = self.plane.gate
            try:
                gate.enter()
            except PipeserveError as exc:
                _log_line(rpc, task, exc.code, started)
                await context.abort(status_code(exc), exc.message)
            try:
                async for message in method(self, request, context):
                    yield message
            except PipeserveError as exc:
                code = exc.code
                await context.abort(status_code(exc), exc.message)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = "INTERNAL"
                log.exception("rpc %s failed", rpc)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                gate.exit()
                _log_line(rpc, task, code, started)

        return wrapper

    return decorate
