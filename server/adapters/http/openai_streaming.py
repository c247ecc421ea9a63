"""Server-sent events for the OpenAI routes: a response that always closes its stream, and the
choices of one request (n, several prompts) read as one stream.

Closing is how a sequence stops early (DataPlane.stream): when the client goes away, Starlette
cancels the response's sending, the cancellation runs through the chunk generator into each
sequence's stream, and the engine drops the sequence at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeserve.server.adapters.http.errors import GatedStream

T = TypeVar("T")

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


class EventStreamResponse(StreamingResponse, GatedStream):
    """`text/event-stream` from a chunk generator, which is closed however the response ends
    (finished, the client gone, or never sent); then the call leaves the server's drain gate
    (`on_close`, set by http/errors.py's `endpoint`)."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncGenerator[bytes, None]):
        super().__init__(chunks, headers=SSE_HEADERS)
        self.chunks = chunks
        self._closed: Callable[[], None] | None = None

    def on_close(self, callback: Callable[[], None]) -> None:
        self._closed = callback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.chunks.aclose()
            finally:
                if self._closed is not None:
                    self._closed()


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncGenerator[tuple[int, T], None]:
    """The items of several streams as they come, each with its stream's index; the first error
    ends all. Closing this closes every stream. A reader that falls behind holds the streams back
    (one item each at most waits here), so the engine's own limit on a slow reader still applies."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                async for item in stream:
                    await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as exc:
            await queue.put((index, done, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                running -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        # The tasks close their streams as they end; waiting for them may itself be cancelled
        # (the client went away), which leaves them to finish on their own.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
