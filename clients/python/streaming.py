"""The text-generation pipeline with streaming: `pipeline("text-generation", ...).stream(prompt)`.

    gen = pipeline("text-generation", target="localhost:8001")
    for event in gen.stream("Once upon a time", max_new_tokens=32):
        print(event.text, end="", flush=True)
    # the last event: event.finish_reason, event.usage, event.time_to_first_token

Leaving the loop early (break, an exception, closing the iterator) cancels the call, and the
server stops the sequence within one step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipeserve.client.pipeline import RemotePipeline
from pipeserve.client.tasks.text_generation import GenerationEvent, TextGenerationCodec


class TextGenerationPipeline(RemotePipeline):
    codec: TextGenerationCodec

    def stream(self, prompt: str, *, timeout: float | None = None, **params: Any) -> Iterator[GenerationEvent]:
        """Yields the generation of one prompt as it happens (the new text only, never the prompt)."""
        request = self.codec.build_stream(prompt, {**self.defaults, **params})
        messages = self._stream(self.stub.GenerateStream, request, timeout)
        try:
            for message in messages:
                yield self.codec.event(message)
        finally:
            messages.close()  # cancels the call if the caller stopped early
