"""OpenAI's response objects, built from the text-generation task's results and stream events.

Completions and chat answer alike but for their shapes: `CompletionShape` (a choice's `text`,
logprobs as parallel lists) and `ChatShape` (a choice's `message` or `delta`, logprobs per token).
What both need: finish reasons in OpenAI's words, the stop sequence left out of the text (OpenAI's
rule; the engine's text ends right after it), usage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from pipeserve.server.errors import ShuttingDown
from pipeserve.server.generation.outputs import TokenLogprob

# The engine's finish reasons (FinishReason values) in OpenAI's words; "cancelled" is not a
# finish: the engine closed (the server stopped past its grace period) before the sequence ended.
FINISH_REASONS = {"length": "length", "eos": "stop", "stop_sequence": "stop"}


def finish_reason(value: str) -> str:
    if value not in FINISH_REASONS:
        raise ShuttingDown("the server stopped before the sequence finished; retry on another replica")
    return FINISH_REASONS[value]


def without_stop(text: str, stops: Sequence[str]) -> str:
    """The text of a sequence that ended on a stop sequence, without it (the longest that ends it:
    the one that began first)."""
    ends = [len(s) for s in stops if text.endswith(s)]
    return text[:len(text) - max(ends)] if ends else text


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class StopHoldBack:
    """A streamed choice's text under OpenAI's stop rule: the stop sequence is not returned.

    A stop sequence may arrive over several deltas ("\\n" then "\\n"), so the tail of the text that
    could begin one is held back until it cannot (then it goes out with the next delta) or the
    sequence ends (then it goes out, less the stop sequence if one ended it).
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, delta: str) -> str:
        if not self.stops:
            return delta
        text = self.held + delta
        keep = max((k for s in self.stops for k in range(min(len(s), len(text)), 0, -1) if text.endswith(s[:k])),
                   default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self, reason: str) -> str:
        text, self.held = self.held, ""
        return without_stop(text, self.stops) if reason == "stop_sequence" else text


def token_text(item: TokenLogprob) -> str:
    """A chosen token's text: as its alternatives name it; a token outside them (sampled, or with
    top_logprobs 0) is written `token_id:<id>`, as vLLM's return_tokens_as_token_ids writes every
    token (the engine reports the alternatives' text only)."""
    for alternative in item.top:
        if alternative.token_id == item.token_id:
            return alternative.token
    return f"token_id:{item.token_id}"


class CompletionShape:
    """/v1/completions: `text_completion` objects; logprobs as parallel lists with text offsets."""

    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    @staticmethod
    def logprobs(items: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens = [token_text(lp) for lp in items]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in items],
                "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in items], "text_offset": offsets}

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk_choice(self, index: int, text: str, finish: str | None, logprobs: dict | None,
                     first: bool) -> dict[str, Any]:
        return self.choice(index, text, finish, logprobs)


class ChatShape:
    """/v1/chat/completions: `chat.completion` objects, an assistant message per choice; streamed,
    a choice's first delta carries the role."""

    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    @staticmethod
    def logprobs(items: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**entry(token_text(lp), lp.logprob),
                             "top_logprobs": [entry(t.token, t.logprob) for t in lp.top]} for lp in items],
                "refusal": None}

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish}

    def chunk_choice(self, index: int, text: str, finish: str | None, logprobs: dict | None,
                     first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
        if text and not first:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def response(shape: CompletionShape | ChatShape, model: str, choices: list[dict], used: dict[str, int]) -> dict:
    return {"id": new_id(shape.id_prefix), "object": shape.object, "created": now(), "model": model,
            "choices": choices, "usage": used}


def embeddings(model: str, vectors: list[list[float] | str], used: dict[str, int]) -> dict:
    return {"object": "list", "model": model, "usage": used,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}
