"""Requests whose bytes are not a valid protobuf message get INVALID_ARGUMENT, not UNKNOWN.

gRPC Python turns an exception in a request deserializer into UNKNOWN ("Unexpected
DecodeError"), which reads like a server bug. A client can send such bytes on purpose or by
mistake: a `string` field holding invalid UTF-8 (proto3 requires UTF-8), a truncated message, a
wrong length prefix. This interceptor gives every handler a deserializer that catches the decode
error and hands the handler a marker instead; the wrapped handler answers the marker with
INVALID_ARGUMENT naming the message type, before any servicer code runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class UndecodableRequest:
    """What the handler receives in place of a request message that failed to decode."""

    def __init__(self, message_type: str, error: Exception):
        self.message_type = message_type
        self.error = error

    @property
    def details(self) -> str:
        # The decoder's own message only repeats the type; say what usually causes it.
        return (f"request: is not a valid {self.message_type} message: its bytes do not parse (a string field "
                "that is not UTF-8, or a truncated or corrupt message)")


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or "protobuf"


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message_type = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return UndecodableRequest(message_type, exc)

    return deserialize


async def _refuse(request: UndecodableRequest, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


def _checked_unary_request(behavior: Callable) -> Callable:
    """Wraps a handler that takes one request, keeping its kind (grpc.aio dispatches on it)."""
    if inspect.isasyncgenfunction(behavior):
        async def stream_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, UndecodableRequest):
                await _refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, UndecodableRequest):
            await _refuse(request, context)
        return await behavior(request, context)

    return unary_out


def _checked_request_stream(behavior: Callable) -> Callable:
    """Wraps a handler that reads a stream of requests: an undecodable one ends the call."""

    def checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        async def messages() -> Any:
            async for request in requests:
                if isinstance(request, UndecodableRequest):
                    await _refuse(request, context)
                yield request

        return messages()

    if inspect.isasyncgenfunction(behavior):
        async def stream_out(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in behavior(checked(requests, context), context):
                yield response

        return stream_out

    async def unary_out(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(checked(requests, context), context)

    return unary_out


def _is_async(behavior: Callable) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def checked_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, answering undecodable requests with INVALID_ARGUMENT.

    Only asyncio handlers are wrapped (all of pipeserve's, health's and reflection's): a
    synchronous one runs in gRPC's thread pool, and wrapping it here would run it on the loop.
    """
    behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if not _is_async(behavior):
        return handler
    deserializer = _tolerant(handler.request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_checked_unary_request(handler.unary_unary), deserializer, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_checked_unary_request(handler.unary_stream), deserializer, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_checked_request_stream(handler.stream_unary), deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(_checked_request_stream(handler.stream_stream), deserializer, serializer)


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Answers requests that are not valid protobuf with INVALID_ARGUMENT (see the module doc)."""

    def __init__(self) -> None:
        # Handlers are looked up per call; wrap each method's handler once.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:
            cached = (handler, checked_handler(handler))
            self._wrapped[handler_call_details.method] = cached
        return cached[1]
