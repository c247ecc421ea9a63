"""Text deltas from a stream of token ids, right for multi-byte characters and token merges.

A byte-level BPE token may hold half a UTF-8 character, and how a token reads can depend on its
neighbours (WordPiece "##" pieces, SentencePiece's leading "▁", cleanup of spaces). So a token's
text is never decoded alone: a small window of recent tokens is decoded twice, without and with
the new tokens, and the delta is what the second adds. While the text ends in an incomplete
character (U+FFFD) the delta waits for the next token. At the end, whatever the windows missed
is added, so that the deltas concatenated are exactly the text of all generated tokens.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"

Decode = Callable[[list[int]], str]


class IncrementalDetokenizer:
    """`decode` turns token ids into text (the tokenizer's decode, special tokens skipped)."""

    def __init__(self, decode: Decode):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # the deltas so far
        # ids[prefix:read] is the context window already turned into text; ids[read:] waits.
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        """Adds a token; returns the text it completes (often "", while a character is incomplete)."""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix : self._read])
        after = self.decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still owed at the end (a held-back partial character, a late merge)."""
        full = self.decode(self.ids)
        if full.startswith(self.text):
            delta = full[len(self.text) :]
            self.text = full
            return delta
        return ""  # a tokenizer whose text changed behind us: the deltas already sent stand

    def token_text(self, token: int) -> str:
        """A single token's text (for logprob alternatives)."""
        return self.decode([token])
