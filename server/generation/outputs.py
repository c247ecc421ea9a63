"""The output processor: a step's logits become each sequence's next token, its text and, at the
end, why it stopped. Runs in the worker thread, right after the forward (as vLLM's output
processor runs after its model runner); the engine only hands the events on.

For each sequence of a step, from its row of the logits:

    choose     the next token (its TokenChooser; one argmax for all the plain greedy rows)
    stop?      an end-of-sequence token, max_new_tokens, the model's positions (StoppingCriteria)
    text       the token's text delta (IncrementalDetokenizer), cut right after a stop sequence,
               which then ends the sequence; at the end, whatever text is still owed
    logprobs   the token's, and the likeliest alternatives', when the sequence asks for them

Stopping lives here alone: the scheduler sees only `SequenceState.finished`, the reader only the
last event's `finish_reason` (a FinishReason, whose value is the word the protocols carry).
"""

from __future__ import annotations

from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from enum import Enum

import torch
from pipeserve.server.errors import BackendError, PipeserveError
from pipeserve.server.generation.sequence import SequencePlan, SequenceState


class FinishReason(str, Enum):
    """Why a sequence ended; the value is what the protocols and the clients say."""

    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass
class TokenEvent:
    """New tokens of one sequence and the text they complete. The last event of a sequence has
    `finish_reason` and the usage counts set."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    # Seconds from arrival to the first token (last event only).
    time_to_first_token: float = 0.0

    def merge(self, later: TokenEvent) -> None:
        """Folds a later event of the same sequence into this one (for a reader that fell behind)."""
        self.token_ids += later.token_ids
        self.text += later.text
        self.logprobs += later.logprobs
        if later.finish_reason is not None:
            self.finish_reason = later.finish_reason
            self.prompt_tokens = later.prompt_tokens
            self.generated_tokens = later.generated_tokens
            self.time_to_first_token = later.time_to_first_token


@dataclass
class SequenceOutcome:
    """A whole sequence, for unary calls."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token: float


# A step's results for the event loop: per sequence an event, or an error that ends it.
Outcome = list[tuple[SequenceState, TokenEvent | PipeserveError]]


class StoppingCriteria:
    """One sequence's stopping rules.

    max_new_tokens: tokens the sequence may add. max_total: the model's context (prompt plus new
    tokens), 0 for no limit. A stop sequence is matched in the generated text; the text is cut
    right after it (the sequence's last token may run past it). A stop string (transformers'
    stop_strings, the pipeline's stop_sequence) ends the sequence at the token that completes it,
    and the text keeps that whole token, as transformers' StopStringCriteria does.
    """

    def __init__(self, max_new_tokens: int, eos_token_ids: Collection[int] = (),
                 stop_sequences: Seq[str] = (), max_total: int = 0, stop_strings: Seq[str] = ()):
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.max_total = max_total
        self._longest_stop = max((len(s) for s in self.stop_sequences), default=0)
        self._longest_string = max((len(s) for s in self.stop_strings), default=0)

    def after_token(self, token: int, generated: int, total: int) -> FinishReason | None:
        """Checked after each new token: `generated` new tokens so far, `total` with the prompt."""
        if token in self.eos_token_ids:
            return FinishReason.EOS
        if generated >= self.max_new_tokens or (self.max_total and total >= self.max_total):
            return FinishReason.LENGTH
        return None

    def stop_in(self, text: str, new_from: int) -> int | None:
        """Where `text` must end if a stop sequence completed in its part from `new_from` on, else None."""
        if not self.stop_sequences:
            return None
        start = max(0, new_from - self._longest_stop + 1)
        ends = [i + len(s) for s in self.stop_sequences if (i := text.find(s, start)) >= 0]
        return min(ends) if ends else None

    def string_in(self, text: str, new_from: int) -> bool:
        """Whether a stop string completed in `text`'s part from `new_from` on (the text stays whole)."""
        if not self.stop_strings or len(text) <= new_from:
            return False
        start = max(0, new_from - self._longest_string + 1)
        return any(text.find(s, start) >= 0 for s in self.stop_strings)


def process(seqs: Seq[SequenceState], logits: torch.Tensor) -> Outcome:
    """Picks each sequence's next token from its row of `logits` [len(seqs), vocab] and turns it
    into an event; a sequence that stops is marked `finished` and its event says why."""
    greedy = torch.argmax(logits, dim=-1).tolist() if any(s.plan.chooser.plain_greedy for s in seqs) else None
    outcome: Outcome = []
    for row, seq in enumerate(seqs):
        plan = seq.plan
        assert plan is not None
        chooser = plan.chooser
        try:
            token = greedy[row] if greedy is not None and chooser.plain_greedy else chooser.choose(logits[row])
        except RuntimeError as exc:  # e.g. NaN logits: this sequence ends, its neighbours go on
            seq.finished = True
            outcome.append((seq, BackendError(f"choosing the next token failed: {exc}")))
            continue
        chooser.record(token)
        seq.generated.append(token)
        event = TokenEvent(token_ids=[token])
        if plan.top_logprobs is not None:
            event.logprobs = [_logprob(logits[row], token, plan)]
        reason = plan.stopping.after_token(token, len(seq.generated), len(plan.prompt_ids) + len(seq.generated))
        event.text, reason = _text(plan, token, reason)
        if reason is not None:
            seq.finished = True
            _finish(event, seq, reason)
        outcome.append((seq, event))
    return outcome


def ending(seq: SequenceState, reason: FinishReason) -> TokenEvent:
    """The last event of a sequence that ends between steps (CANCELLED: the engine closes)."""
    return _finish(TokenEvent(), seq, reason)


def _finish(event: TokenEvent, seq: SequenceState, reason: FinishReason) -> TokenEvent:
    event.finish_reason = reason
    event.prompt_tokens = seq.prompt_tokens
    event.generated_tokens = len(seq.generated)
    event.time_to_first_token = seq.time_to_first_token
    return event


def _text(plan: SequencePlan, token: int, reason: FinishReason | None) -> tuple[str, FinishReason | None]:
    """The token's text delta, cut after a stop sequence (which then ends the sequence)."""
    text = plan.detokenizer
    start = len(text.text)
    text.push(token)
    if reason is not None:
        text.flush()
    cut = plan.stopping.stop_in(text.text, start)
    if cut is not None:
        text.text = text.text[:cut]
        reason = FinishReason.STOP_SEQUENCE
    elif reason is None and plan.stopping.string_in(text.text, start):
        reason = FinishReason.STOP_SEQUENCE
        text.flush()
    return text.text[start:], reason


def _logprob(logits: torch.Tensor, token: int, plan: SequencePlan) -> TokenLogprob:
    logprobs = torch.log_softmax(logits, dim=-1)
    top: tuple[TopLogprob, ...] = ()
    if plan.top_logprobs:
        values, ids = torch.topk(logprobs, min(plan.top_logprobs, logprobs.shape[-1]))
        top = tuple(TopLogprob(i, plan.detokenizer.token_text(i), v) for v, i in zip(values.tolist(), ids.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)
