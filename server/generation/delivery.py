"""Delivery: what one sequence hands its reader, through a bounded buffer, then an end."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from pipeserve.server.errors import Overloaded, PipeserveError
from pipeserve.server.generation.outputs import SequenceOutcome, TokenEvent


class SequenceOutput:
    """The reader's end of one sequence: its events as the engine makes them. Lives on the event loop.

    The engine `push`es events; beyond `limit` unread events the reader is too slow and the
    sequence ends with RESOURCE_EXHAUSTED (the reader still gets the events before that). The
    reader iterates `batches()` (events that arrived together, merged) or awaits `outcome()`;
    `cancel()` (or leaving the iteration early) stops the sequence within one engine step.
    """

    def __init__(self, limit: int | None, on_cancel: Callable[[], None]):
        self.limit = limit
        self._events: deque[TokenEvent] = deque()
        self._error: PipeserveError | None = None
        self._finished = False
        self._ready = asyncio.Event()
        self._on_cancel = on_cancel
        self.cancelled = False

    # -- the engine's side ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._finished or self._error is not None or self.cancelled

    def push(self, event: TokenEvent) -> bool:
        """Queues an event; False (and the sequence fails) when the reader is `limit` events behind."""
        if self.closed:
            return True
        if self.limit is not None and len(self._events) >= self.limit and event.finish_reason is None:
            self.fail(Overloaded(
                f"the stream's reader fell {self.limit} messages behind (generation.max_stream_buffer); "
                "read faster or ask for fewer tokens"))
            return False
        self._events.append(event)
        if event.finish_reason is not None:
            self._finished = True
        self._ready.set()
        return True

    def fail(self, error: PipeserveError) -> None:
        if not self.closed:
            self._error = error
            self._ready.set()

    # -- the reader's side ---------------------------------------------------------------------

    def cancel(self) -> None:
        """The reader is gone: stop the sequence (a no-op once it has ended)."""
        if not self.cancelled:
            self.cancelled = True
            if not (self._finished or self._error is not None):
                self._on_cancel()

    async def batches(self) -> AsyncIterator[TokenEvent]:
        """Yields the events as they come, merging those that piled up; raises the sequence's error."""
        while True:
            if not self._events:
                if self._error is not None:
                    raise self._error
                if self._finished:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            event = self._events.popleft()
            while self._events:
                event.merge(self._events.popleft())
            yield event

    async def outcome(self) -> SequenceOutcome:
        """Waits for the whole sequence."""
        whole = TokenEvent()
        async for event in self.batches():
            whole.merge(event)
        assert whole.finish_reason is not None
        return SequenceOutcome(whole.token_ids, whole.text, whole.logprobs, whole.finish_reason,
                               whole.prompt_tokens, whole.generated_tokens, whole.time_to_first_token)
