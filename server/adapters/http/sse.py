"""Server-sent events: a streaming response that holds its call's place in the drain gate and
stops the work behind it as soon as the client goes away."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeserve.server.adapters.http.errors import GatedStream


def sse_data(doc: Any) -> bytes:
    """One event: `data: <json>` and the blank line that ends it."""
    return b"data: " + json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStream(StreamingResponse, GatedStream):
    """`text/event-stream` from an async generator of encoded events (`sse_data`).

    When the client disconnects, Starlette cancels the task sending the events: the generator gets
    the cancellation where it waits (for the next token), so a `contextlib.aclosing` around the
    DataPlane's stream inside it stops the sequence at once, not when the next event would be sent.
    Whatever way the response ends, the generator is closed and the `on_close` callbacks run (the
    drain gate's exit), even if it never started.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        # no-cache and no proxy buffering: each event must reach the client as it is made.
        super().__init__(events, headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})
        self._events = events
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                for callback in self._on_close:
                    callback()
