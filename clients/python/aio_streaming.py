"""The asyncio text-generation pipeline with streaming: `async for event in gen.stream(prompt)`.

Leaving the loop early cancels the call, and the server stops the sequence within one step
(with `break`, the async generator is closed when it is collected; `contextlib.aclosing(...)`
closes it at once).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pipeserve.client.aio import AsyncRemotePipeline
from pipeserve.client.tasks.text_generation import GenerationEvent, TextGenerationCodec


class AsyncTextGenerationPipeline(AsyncRemotePipeline):
    codec: TextGenerationCodec

    async def stream(self, prompt: str, *, timeout: float | None = None,
                     **params: Any) -> AsyncIterator[GenerationEvent]:
        """Yields the generation of one prompt as it happens (the new text only, never the prompt)."""
        request = self.codec.build_stream(prompt, {**self.defaults, **params})
        messages = self._stream(self.stub.GenerateStream, request, timeout)
        try:
            async for message in messages:
                yield self.codec.event(message)
        finally:
            await messages.aclose()  # cancels the call if the caller stopped early
