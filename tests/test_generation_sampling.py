"""The engine's token chooser against transformers' own logits processors: for each processor it
serves, the scores it leaves (and so the greedy token and the sampling distribution) equal what
`generate` builds with `_get_logits_processor` for the same parameters, on random logits and a
random sequence so far. No server."""

from __future__ import annotations

import pytest
import torch
import transformers

from pipeserve.server.generation.sampling import SamplingParams, TokenChooser

VOCAB = 50
EOS = 3
PROMPT = 6


@pytest.fixture(scope="module")
def model():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                     eos_token_id=EOS, bos_token_id=EOS)
    return transformers.GPT2LMHeadModel(config).eval()


def transformers_scores(model, ids: list[int], logits: torch.Tensor, **kwargs) -> torch.Tensor:
    config = transformers.GenerationConfig(eos_token_id=EOS, **kwargs)
    model._prepare_special_tokens(config, True, device="cpu")
    input_ids = torch.tensor([ids])
    processors = model._get_logits_processor(config, input_ids_seq_length=PROMPT, encoder_input_ids=input_ids,
                                             device="cpu", model_kwargs={"attention_mask": torch.ones_like(input_ids)})
    return processors(input_ids, logits[None, :].clone())


def our_scores(ids: list[int], logits: torch.Tensor, **kwargs) -> torch.Tensor:
    chooser = TokenChooser(SamplingParams(**kwargs), ids[:PROMPT])
    for token in ids[PROMPT:]:
        chooser.record(token)
    scores = chooser.process(logits[None, :])
    return chooser.warp(scores) if kwargs.get("do_sample") else scores


CASES = [
    dict(repetition_penalty=1.7),
    dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3),
    dict(bad_words_ids=[[7], [9, 11], [4, 5, 12], [EOS]]),
    dict(sequence_bias=[[[7], 2.5], [[4, 5, 13], -4.0], [[14], -1.5]]),
    dict(min_length=40),
    dict(min_new_tokens=30),
    dict(min_new_tokens=2),
    dict(suppress_tokens=[1, 2, 30]),
    dict(begin_suppress_tokens=[5, 6]),
    dict(forced_eos_token_id=EOS, max_length=21),
    dict(do_sample=True, temperature=0.6, top_k=10),
    dict(do_sample=True, top_k=0, top_p=0.8),
    dict(do_sample=True, top_k=0, min_p=0.2),
    dict(do_sample=True, top_k=0, typical_p=0.7),
    dict(do_sample=True, top_k=0, epsilon_cutoff=0.03),
    dict(do_sample=True, top_k=0, eta_cutoff=0.05),
    dict(do_sample=True, temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.2,
         no_repeat_ngram_size=2, bad_words_ids=[[8]], min_new_tokens=50),
]


def ours_from(kwargs: dict, generated: int) -> dict:
    """The chooser's parameters for transformers' kwargs (what the text-generation task derives)."""
    ours = {k: v for k, v in kwargs.items() if k not in ("bad_words_ids", "sequence_bias", "forced_eos_token_id")}
    if "bad_words_ids" in kwargs:
        ours["bad_words"] = tuple(tuple(w) for w in kwargs["bad_words_ids"] if w != [EOS])
    if "sequence_bias" in kwargs:
        ours["sequence_bias"] = tuple((tuple(s), float(b)) for s, b in kwargs["sequence_bias"])
    if "forced_eos_token_id" in kwargs:
        ours["forced_eos_token_id"] = (kwargs["forced_eos_token_id"],)
    if any(k in kwargs for k in ("min_length", "min_new_tokens")):
        ours["eos_token_ids"] = (EOS,)
    if kwargs.get("do_sample"):
        ours.setdefault("top_k", 50)  # generate's default when sampling
    return ours


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: ",".join(sorted(k)))
@pytest.mark.parametrize("generated", [0, 1, 14])
def test_the_chooser_processes_the_logits_as_transformers_does(model, kwargs, generated):
    torch.manual_seed(len(kwargs) * 31 + generated)
    # A sequence with repeats, so that the n-gram, bad-word and bias rules have something to find.
    ids = [4, 5, 9, 11, 4, 5][:PROMPT] + [int(t) for t in torch.randint(4, 16, (generated,))]
    if generated >= 2:
        ids[-2:] = [4, 5]
    logits = torch.randn(VOCAB) * 3
    theirs = transformers_scores(model, ids, logits, **kwargs)
    ours = our_scores(ids, logits, **ours_from(kwargs, generated))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    assert torch.equal(ours[finite], theirs[finite])


def test_plain_greedy_is_kept_for_requests_without_processors():
    assert TokenChooser(SamplingParams(), [1, 2]).plain_greedy
    assert not TokenChooser(SamplingParams(no_repeat_ngram_size=2), [1, 2]).plain_greedy
    # min lengths hold nothing back without an end-of-sequence token
    assert TokenChooser(SamplingParams(min_new_tokens=3), [1, 2]).plain_greedy
