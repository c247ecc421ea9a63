"""When a sequence stops: its end-of-sequence tokens, its length budget, its stop sequences."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import Enum


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


class StoppingCriteria:
    """One sequence's stopping rules.

    max_new_tokens: tokens the sequence may add. max_total: the model's context (prompt plus new
    tokens), 0 for no limit. A stop sequence is matched in the generated text; the text is cut
    right after it (the sequence's last token may run past it).
    """

    def __init__(self, max_new_tokens: int, eos_token_ids: Collection[int] = (),
                 stop_sequences: Sequence[str] = (), max_total: int = 0):
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_sequences = tuple(s for s in stop_sequences if s)
        self.max_total = max_total
        self._longest_stop = max((len(s) for s in self.stop_sequences), default=0)

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
