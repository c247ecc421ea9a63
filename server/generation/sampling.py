"""Choosing each sequence's next token: greedy or sampled, with transformers' semantics.

The logits go through transformers' processors in its order and with its arithmetic
(`GenerationMixin._get_logits_processor`), so a greedy sequence picks the token `generate` picks
and a seeded one draws what `torch.manual_seed(seed); generate(...)` draws:

    sequence_bias           a bias on a token that completes a biased sequence
    repetition_penalty      tokens already in the sequence (prompt included)
    no_repeat_ngram_size    tokens that would repeat an n-gram of the sequence
    bad_words_ids           -inf on a token that completes a bad word
    min_length              no end-of-sequence before the sequence (prompt included) is this long
    min_new_tokens          no end-of-sequence before this many new tokens
    forced_bos_token_id     the first token after a one-token prompt
    forced_eos_token_id     the token at max_length - 1
    suppress_tokens         never these tokens
    begin_suppress_tokens   not these as the first new token
  and when sampling (transformers' former "warpers"):
    temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff
  then softmax and a draw (sampling) or the argmax (greedy).

Each sequence samples with its own `torch.Generator`: its draws do not depend on what else
shares the batch. What this chooser lacks (beam search and the rarer processors) the task runs
as whole sequences through `Instance.generate` instead (tasks/generation_params.py says which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A token sequence and the bias added to its last token's logit when the rest of it ends the sequence so far.
SequenceBias = tuple[tuple[tuple[int, ...], float], ...]


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    # 0: off.
    top_k: int = 0
    top_p: float = 1.0
    # None: off (0.0 keeps every token, as in transformers).
    min_p: float | None = None
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    sequence_bias: SequenceBias = ()
    # bad_words_ids as transformers keeps them: without those that are an end-of-sequence token alone.
    bad_words: tuple[tuple[int, ...], ...] = ()
    # Total length (prompt included) before an end-of-sequence token may come; 0: off.
    min_length: int = 0
    min_new_tokens: int = 0
    # The end-of-sequence tokens min_length and min_new_tokens hold back (none: they do nothing).
    eos_token_ids: tuple[int, ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    # The total length forced_eos_token_id counts to (generate's max_length).
    max_length: int = 0
    # None: a random seed.
    seed: int | None = None

    @property
    def processes_logits(self) -> bool:
        """Whether any processor changes the logits before the choice (greedy is then not the plain argmax)."""
        return bool(
            self.repetition_penalty != 1.0 or self.no_repeat_ngram_size or self.sequence_bias or self.bad_words
            or (self.eos_token_ids and (self.min_length or self.min_new_tokens)) or self.suppress_tokens
            or self.begin_suppress_tokens or self.forced_bos_token_id is not None or self.forced_eos_token_id
        )


class TokenChooser:
    """One sequence's next-token choice. Knows the sequence's tokens (for the processors that read them)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int]):
        self.params = params
        self.generator: torch.Generator | None = None
        if params.do_sample:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)
        self.prompt_length = len(prompt_ids)
        # Every token of the sequence so far, prompt included, as transformers' processors see input_ids.
        self._keeps_ids = params.processes_logits
        # The choice is the logits' argmax (the engine then picks it for the whole batch at once).
        # An attribute, not a property: the output processor reads it for every row of every step.
        self.plain_greedy = not params.do_sample and not self._keeps_ids
        self._ids = list(prompt_ids) if self._keeps_ids else []
        # no_repeat_ngram_size: each (n-1)-gram of the sequence -> the tokens that followed it.
        self._ngrams: dict[tuple[int, ...], set[int]] = {}
        if params.no_repeat_ngram_size:
            n = params.no_repeat_ngram_size
            for end in range(n, len(self._ids) + 1):
                self._add_ngram(end)

    def record(self, token: int) -> None:
        if self._keeps_ids:
            self._ids.append(token)
            if self.params.no_repeat_ngram_size:
                self._add_ngram(len(self._ids))

    def _add_ngram(self, end: int) -> None:
        n = self.params.no_repeat_ngram_size
        ids = self._ids
        self._ngrams.setdefault(tuple(ids[end - n : end - 1]), set()).add(ids[end - 1])

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits [vocab] (float32)."""
        scores = self.process(logits[None, :])
        if not self.params.do_sample:
            return int(torch.argmax(scores, dim=-1))
        scores = self.warp(scores)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, num_samples=1, generator=self.generator))

    # -- transformers' logits processors, in its order ------------------------------------------

    def process(self, scores: torch.Tensor) -> torch.Tensor:
        """The processors that apply to greedy and sampled choices alike; scores [1, vocab]."""
        p = self.params
        if not self._keeps_ids:
            return scores
        vocab = scores.shape[-1]
        ids = self._ids
        length = len(ids)
        if p.sequence_bias:
            scores = scores + self._bias(p.sequence_bias, vocab, scores.dtype)
        if p.repetition_penalty != 1.0 and ids:
            seen = torch.tensor([ids], dtype=torch.long)
            picked = torch.gather(scores, 1, seen)
            picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
            scores = scores.scatter(1, seen, picked)
        if p.no_repeat_ngram_size and length >= p.no_repeat_ngram_size:
            banned = self._ngrams.get(tuple(ids[length + 1 - p.no_repeat_ngram_size :]))
            if banned:
                scores = scores.masked_fill(_mask(banned, vocab), -float("inf"))
        if p.bad_words:
            scores = scores + self._bias(tuple((word, -float("inf")) for word in p.bad_words), vocab, scores.dtype)
        eos = p.eos_token_ids
        if eos and p.min_length and length < p.min_length:
            scores = torch.where(_mask(eos, vocab), -math.inf, scores)
        if eos and p.min_new_tokens and length - self.prompt_length < p.min_new_tokens:
            scores = torch.where(_mask(eos, vocab), -math.inf, scores)
        if p.forced_bos_token_id is not None and length == 1:
            scores = torch.full_like(scores, -math.inf)
            scores[:, p.forced_bos_token_id] = 0
        if p.forced_eos_token_id and length == p.max_length - 1:
            scores = torch.full_like(scores, -math.inf)
            scores[:, list(p.forced_eos_token_id)] = 0
        if p.suppress_tokens:
            scores = torch.where(_mask(p.suppress_tokens, vocab), -float("inf"), scores)
        if p.begin_suppress_tokens and length == self._begin_index:
            scores = torch.where(_mask(p.begin_suppress_tokens, vocab), -float("inf"), scores)
        return scores

    @property
    def _begin_index(self) -> int:
        # As generate counts it: a forced first token after a one-token prompt moves the beginning on by one.
        if self.prompt_length > 1 or self.params.forced_bos_token_id is None:
            return self.prompt_length
        return self.prompt_length + 1

    def _bias(self, biases: SequenceBias, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """SequenceBiasLogitsProcessor's bias: single tokens always, longer sequences when the
        sequence so far ends with all but their last token."""
        bias = torch.zeros((1, vocab), dtype=torch.float)
        ids = self._ids
        for sequence, value in biases:
            if len(sequence) == 1:
                bias[0, sequence[0]] += value
            elif len(sequence) - 1 <= len(ids) and tuple(ids[len(ids) - len(sequence) + 1 :]) == sequence[:-1]:
                bias[0, sequence[-1]] += value
        return bias.to(dtype)

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The sampling-only processors (transformers' warpers), min_tokens_to_keep 1."""
        p = self.params
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
        if p.min_p is not None:
            probs = torch.softmax(scores, dim=-1)
            drop = probs < p.min_p * probs.amax(dim=-1, keepdim=True)
            drop.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
            scores = scores.masked_fill(drop, -float("inf"))
        if p.typical_p < 1.0:
            normalized = torch.nn.functional.log_softmax(scores, dim=-1)
            entropy = -(normalized * torch.exp(normalized)).nansum(-1, keepdim=True)
            shifted = torch.abs((-normalized) - entropy)
            sorted_shifted, order = torch.sort(shifted, descending=False)
            cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
            last = (cumulative < p.typical_p).sum(dim=1)
            last.clamp_(max=sorted_shifted.shape[-1] - 1)
            drop = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
            drop[..., :1] = False
            scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
        if 0.0 < p.epsilon_cutoff < 1.0:
            drop = (scores.softmax(dim=-1) < p.epsilon_cutoff) & (scores < torch.topk(scores, 1)[0][..., -1, None])
            scores = scores.masked_fill(drop, -float("inf"))
        if 0.0 < p.eta_cutoff < 1.0:
            epsilon = torch.tensor(p.eta_cutoff)
            entropy = torch.distributions.Categorical(logits=scores).entropy()
            eta = torch.min(epsilon, torch.sqrt(epsilon) * torch.exp(-entropy))[..., None]
            drop = (scores.softmax(dim=-1) < eta) & (scores < torch.topk(scores, 1)[0][..., -1, None])
            scores = scores.masked_fill(drop, -float("inf"))
        return scores


def _mask(tokens, vocab: int) -> torch.Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[list(tokens)] = True
    return mask

