"""Choosing each sequence's next token: greedy or sampled, with transformers' semantics.

The transforms run in transformers' order and with its arithmetic (repetition penalty, then for
sampling temperature, top-k, top-p, softmax, multinomial), so a greedy sequence picks the token
`generate` picks and a seeded one draws what `torch.manual_seed(seed); generate(...)` draws.
Each sequence samples with its own `torch.Generator`: its draws do not depend on what else
shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    # 0: off.
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    # None: a random seed.
    seed: int | None = None


class TokenChooser:
    """One sequence's next-token choice. Knows the sequence's tokens (for the repetition penalty)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.generator: torch.Generator | None = None
        if params.do_sample:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        # Every token of the sequence so far, prompt included, as transformers penalises them.
        self._seen = list(prompt_ids) if params.repetition_penalty != 1.0 else []

    @property
    def plain_greedy(self) -> bool:
        """The choice is the logits' argmax (the engine then picks it for the whole batch at once)."""
        return not self.params.do_sample and self.params.repetition_penalty == 1.0

    def record(self, token: int) -> None:
        if self.params.repetition_penalty != 1.0:
            self._seen.append(token)

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits [vocab] (float32)."""
        p = self.params
        scores = logits[None, :]
        if p.repetition_penalty != 1.0 and self._seen:
            seen = torch.tensor([self._seen], dtype=torch.long)
            picked = torch.gather(scores, 1, seen)
            picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            scores = scores.scatter(1, seen, picked)
        if not p.do_sample:
            return int(torch.argmax(scores, dim=-1))
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            k = min(p.top_k, scores.size(-1))
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - p.top_p)
            drop[..., -1:] = False  # the likeliest token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))
