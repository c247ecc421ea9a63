"""The choices of one streamed OpenAI request (n of them per prompt, several prompts) read as one
stream of (choice, event).

Closing is how a sequence stops early (DataPlane.stream): when the client goes away, the
response (http/sse.py's EventStream) closes its chunk generator, which closes this, which closes
every choice's stream, and the engine drops the sequences at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


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
