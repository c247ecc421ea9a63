"""The output processor on its own, from fake logits: the token each sequence gets, its text, when
and why it stops (eos, max_new_tokens, the model's positions, stop strings across tokens), its
logprobs; and the delivery of events to a reader. No model, no server."""

from __future__ import annotations

import asyncio

import pytest
import torch
from pipeserve.server.errors import BackendError, Overloaded
from pipeserve.server.generation import outputs
from pipeserve.server.generation.delivery import SequenceOutput
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.server.generation.outputs import FinishReason, StoppingCriteria, TokenEvent
from pipeserve.server.generation.sampling import SamplingParams, TokenChooser
from pipeserve.server.generation.sequence import SequencePlan, SequenceState

EOS = 0
# A toy vocabulary; the stop strings below fall across its tokens.
VOCAB = ["</s>", "Hel", "lo", " wor", "ld", "!", " and", " more"]


def decode(ids: list[int]) -> str:
    return "".join(VOCAB[i] for i in ids if i != EOS)  # special tokens skipped, as the tasks decode


def sequence(max_new_tokens: int = 16, stop: tuple[str, ...] = (), max_total: int = 0, top_logprobs: int | None = None,
             sampling: SamplingParams | None = None, prompt: tuple[int, ...] = (1,)) -> SequenceState:
    """A sequence as admission leaves it: planned (greedy unless `sampling` says otherwise)."""
    ids = list(prompt)
    seq = SequenceState(lambda: None, None, output=None)  # type: ignore[arg-type,return-value]
    chooser = TokenChooser(sampling or SamplingParams(), ids)
    seq.plan = SequencePlan(ids, chooser, StoppingCriteria(max_new_tokens, {EOS}, stop, max_total),
                            IncrementalDetokenizer(decode), top_logprobs)
    seq.first_token_at = seq.arrived + 0.25
    return seq


def logits(*tokens: int) -> torch.Tensor:
    """One row per sequence, whose argmax is the given token."""
    rows = torch.zeros(len(tokens), len(VOCAB))
    for row, token in enumerate(tokens):
        rows[row, token] = 5.0
    return rows


def run(seqs: list[SequenceState], steps: list[tuple[int, ...]]) -> list[list[TokenEvent]]:
    """Steps the sequences through the given tokens; each sequence's events (a finished one leaves)."""
    events: list[list[TokenEvent]] = [[] for _ in seqs]
    for tokens in steps:
        live = [i for i, seq in enumerate(seqs) if not seq.finished]
        for i, (seq, event) in zip(live, outputs.process([seqs[i] for i in live], logits(*[tokens[i] for i in live]))):
            assert seq is seqs[i]
            events[i].append(event)
    return events


def test_each_sequence_gets_its_rows_token_and_the_text_it_completes():
    a, b = sequence(), sequence()
    events = run([a, b], [(1, 3), (2, 4)])
    assert a.generated == [1, 2] and b.generated == [3, 4]
    assert [e.text for e in events[0]] == ["Hel", "lo"]
    assert [e.token_ids for e in events[1]] == [[3], [4]]
    assert not a.finished and all(e.finish_reason is None for e in events[0])


def test_max_new_tokens_ends_the_sequence_with_length_and_its_usage():
    seq = sequence(max_new_tokens=2, prompt=(1, 2, 3))
    *_, last = run([seq], [(3,), (4,)])[0]
    assert seq.finished
    assert last.finish_reason is FinishReason.LENGTH
    assert (last.prompt_tokens, last.generated_tokens) == (3, 2)
    assert last.time_to_first_token == pytest.approx(0.25)


def test_an_end_of_sequence_token_ends_it_with_eos():
    seq = sequence()
    events = run([seq], [(1,), (EOS,), (2,)])[0]
    assert len(events) == 2 and seq.finished
    assert events[-1].finish_reason is FinishReason.EOS
    assert events[-1].text == ""


def test_the_models_positions_end_the_sequence_with_length():
    seq = sequence(max_total=3, prompt=(1, 2))  # room for one new token
    (event,) = run([seq], [(3,), (4,)])[0]
    assert event.finish_reason is FinishReason.LENGTH and event.generated_tokens == 1


def test_a_stop_string_across_token_boundaries_cuts_the_text_right_after_it():
    seq = sequence(stop=("lo w",))
    events = run([seq], [(1,), (2,), (3,), (4,)])[0]
    assert len(events) == 3 and seq.finished
    assert [e.text for e in events] == ["Hel", "lo", " w"]  # " wor" cut after the stop string
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE
    assert seq.generated == [1, 2, 3]  # the last token ran past the stop string; the text did not
    assert seq.plan.detokenizer.text == "Hello w"


def test_of_stop_strings_completed_by_one_token_the_text_ends_after_the_earliest():
    seq = sequence(stop=(" more", " mo"))
    events = run([seq], [(1,), (7,), (2,)])[0]
    assert [e.text for e in events] == ["Hel", " mo"]
    assert events[-1].finish_reason is FinishReason.STOP_SEQUENCE


def test_the_finish_reasons_are_the_protocols_words():
    assert {reason.value for reason in FinishReason} == {"length", "eos", "stop_sequence", "cancelled"}
    assert FinishReason("stop_sequence") is FinishReason.STOP_SEQUENCE


def test_logprobs_give_the_tokens_and_the_likeliest_alternatives():
    seq = sequence(top_logprobs=2)
    row = torch.tensor([[0.0, 3.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    ((_, event),) = outputs.process([seq], row)
    expected = torch.log_softmax(row[0], dim=-1)
    (logprob,) = event.logprobs
    assert logprob.token_id == 1 and logprob.logprob == pytest.approx(float(expected[1]))
    assert [(t.token_id, t.token) for t in logprob.top] == [(1, "Hel"), (3, " wor")]
    assert logprob.top[1].logprob == pytest.approx(float(expected[3]))
    assert outputs.process([sequence()], row)[0][1].logprobs == []  # not asked for


def test_a_sequence_whose_token_cannot_be_chosen_fails_alone():
    sampled, greedy = sequence(sampling=SamplingParams(do_sample=True, seed=1)), sequence()
    rows = logits(1, 3)
    rows[0] = float("nan")
    (s, error), (g, event) = outputs.process([sampled, greedy], rows)
    assert s is sampled and isinstance(error, BackendError) and sampled.finished
    assert g is greedy and event.token_ids == [3] and not greedy.finished


def test_a_sequence_ended_between_steps_reports_its_usage():
    seq = sequence(prompt=(1, 2))
    run([seq], [(3,)])
    event = outputs.ending(seq, FinishReason.CANCELLED)
    assert (event.finish_reason, event.prompt_tokens, event.generated_tokens) == (FinishReason.CANCELLED, 2, 1)
    assert event.token_ids == [] and event.text == ""


def test_the_reader_gets_events_that_piled_up_merged_and_then_the_outcome():
    async def scenario():
        output = SequenceOutput(None, on_cancel=lambda: None)
        output.push(TokenEvent([1], "Hel"))
        output.push(TokenEvent([2], "lo"))
        batches = output.batches()
        first = await batches.__anext__()
        output.push(TokenEvent([5], "!", finish_reason=FinishReason.EOS, prompt_tokens=1, generated_tokens=3))
        rest = [e async for e in batches]
        return first, rest

    first, rest = asyncio.run(scenario())
    assert (first.token_ids, first.text) == ([1, 2], "Hello")
    assert [e.finish_reason for e in rest] == [FinishReason.EOS]

    async def whole():
        output = SequenceOutput(None, on_cancel=lambda: None)
        for event in (TokenEvent([1], "Hel"), TokenEvent([2], "lo", finish_reason=FinishReason.LENGTH,
                                                          prompt_tokens=4, generated_tokens=2)):
            output.push(event)
        return await output.outcome()

    outcome = asyncio.run(whole())
    assert (outcome.text, outcome.token_ids, outcome.finish_reason, outcome.prompt_tokens) == (
        "Hello", [1, 2], FinishReason.LENGTH, 4)


def test_a_reader_too_far_behind_ends_with_resource_exhausted_and_a_cancel_reaches_the_engine():
    cancelled = []
    output = SequenceOutput(2, on_cancel=lambda: cancelled.append(True))
    assert output.push(TokenEvent([1]))
    assert output.push(TokenEvent([2]))
    assert not output.push(TokenEvent([3]))  # the engine then stops the sequence

    async def read():
        return [e async for e in output.batches()]

    with pytest.raises(Overloaded, match="fell 2 messages behind"):
        asyncio.run(read())
    output.cancel()
    assert cancelled == []  # it had ended already
    live = SequenceOutput(None, on_cancel=lambda: cancelled.append(True))
    live.cancel()
    live.cancel()
    assert cancelled == [True]
