"""The generation scheduler on its own: admission order, the step's budgets, Overloaded past
max_waiting, deadlines and cancellation, the refill wait. Fake sequences, no model, no server."""

from __future__ import annotations

import pytest
from pipeserve.server.errors import BackendError, DeadlineExceeded, InvalidArgument, Overloaded
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.server.generation.outputs import StoppingCriteria
from pipeserve.server.generation.sampling import SamplingParams, TokenChooser
from pipeserve.server.generation.scheduler import Scheduler, place
from pipeserve.server.generation.sequence import SequencePlan, SequenceState
from pipeserve.server.repository.model_settings import GenerationSettings

NOW = 1000.0


def plan(prompt_tokens: int) -> SequencePlan:
    ids = list(range(1, prompt_tokens + 1))
    return SequencePlan(ids, TokenChooser(SamplingParams(), ids), StoppingCriteria(8),
                        IncrementalDetokenizer(lambda ids: "".join(map(str, ids))))


def sequence(prompt_tokens: int = 3, deadline: float | None = None, make_plan=None) -> SequenceState:
    return SequenceState(make_plan or (lambda: plan(prompt_tokens)), deadline, output=None)  # type: ignore[arg-type]


def scheduler(**limits) -> Scheduler:
    return Scheduler("m/1", GenerationSettings(**limits))


def test_the_oldest_waiting_sequences_take_the_free_rows_and_the_rest_wait_in_order():
    s = scheduler(max_concurrent_sequences=4)
    s.running = [sequence(), sequence()]
    queued = [sequence() for _ in range(5)]
    for seq in queued:
        s.enqueue(seq)
    assert s.take() == queued[:2]
    assert list(s.waiting) == queued[2:]
    assert s.load == 7  # waiting, being admitted and running all count


def test_a_full_batch_takes_no_one():
    s = scheduler(max_concurrent_sequences=2)
    s.running = [sequence(), sequence(), sequence()]  # more than the limit: never a negative room
    s.enqueue(sequence())
    assert s.take() == []
    assert len(s.waiting) == 1


def test_admission_keeps_the_prompts_within_the_token_budget_and_defers_the_rest_without_overtaking():
    s = scheduler(max_tokens_per_step=50)
    taken = [sequence(10), sequence(30), sequence(20), sequence(1)]
    admission = s.admit(taken, NOW)
    assert admission.ready == taken[:2]
    # 20 is past what is left (10); the 1 behind it waits too, so that nobody overtakes.
    assert admission.deferred == taken[2:]
    assert not admission.failed
    assert all(seq.plan is not None for seq in taken[:3])


def test_the_first_prompt_always_runs_however_long():
    s = scheduler(max_tokens_per_step=8)
    taken = [sequence(100), sequence(1)]
    admission = s.admit(taken, NOW)
    assert admission.ready == taken[:1]
    assert admission.deferred == taken[1:]


def test_the_running_rows_use_up_the_token_budget_too():
    s = scheduler(max_tokens_per_step=12)
    s.running = [sequence() for _ in range(4)]  # one token each this step: 8 left
    taken = [sequence(5), sequence(4)]
    assert s.admit(taken, NOW).ready == taken[:1]


def test_deferred_sequences_go_back_to_the_head_of_the_queue_in_order():
    s = scheduler(max_concurrent_sequences=8, max_tokens_per_step=5)
    first, second, third, later = sequence(4), sequence(4), sequence(4), sequence(1)
    for seq in (first, second, third):
        s.enqueue(seq)
    taken = s.take()
    s.enqueue(later)  # arrives while the step runs
    admission = s.admit(taken, NOW)
    s.requeue(admission.deferred)
    assert admission.ready == [first]
    assert list(s.waiting) == [second, third, later]
    assert s.admitting == []
    # A deferred sequence keeps its plan: it is not tokenized again.
    made = second.plan
    s.admit(s.take(), NOW)
    assert second.plan is made


def test_expired_cancelled_and_unplannable_sequences_leave_at_admission():
    s = scheduler()

    def too_long() -> SequencePlan:
        raise InvalidArgument("input", "too long")

    def broken() -> SequencePlan:
        raise KeyError("tokenizer bug")

    expired, cancelled, invalid, buggy, fine = (sequence(deadline=NOW), sequence(), sequence(make_plan=too_long),
                                                sequence(make_plan=broken), sequence(deadline=NOW + 1))
    cancelled.stop_requested = True
    admission = s.admit([expired, cancelled, invalid, buggy, fine], NOW)
    assert admission.ready == [fine]
    errors = dict(admission.failed)
    assert set(errors) == {expired, invalid, buggy}  # a cancelled one just goes
    assert isinstance(errors[expired], DeadlineExceeded)
    assert isinstance(errors[invalid], InvalidArgument)
    assert isinstance(errors[buggy], BackendError) and "KeyError" in errors[buggy].message


def test_a_withdrawn_sequence_leaves_the_queue_at_once_and_a_running_one_at_the_next_step():
    s = scheduler()
    waiting, running, staying = sequence(), sequence(), sequence(deadline=NOW + 1)
    s.enqueue(waiting)
    s.running = [running, staying]
    s.withdraw(waiting)
    s.withdraw(running)
    assert not s.waiting
    assert running.stop_requested
    rows, failed = s.leaving(NOW)
    assert rows == [0] and failed == []


def test_running_sequences_past_their_deadline_leave_with_deadline_exceeded():
    s = scheduler()
    on_time, late = sequence(deadline=NOW + 5), sequence(deadline=NOW - 1)
    s.running = [on_time, late, sequence()]
    rows, failed = s.leaving(NOW)
    assert rows == [1]
    assert [seq for seq, _ in failed] == [late]
    assert isinstance(failed[0][1], DeadlineExceeded)


def test_released_rows_follow_the_decoder_states_new_order():
    s = scheduler()
    a, b, c, d = (sequence() for _ in range(4))
    s.running = [a, b, c, d]
    b.finished = True
    assert s.finished_rows() == [1]
    s.reorder([0, 3, 2])  # the last row moved into the hole, as RowCache.release does
    assert s.running == [a, d, c]
    s.join([b])
    assert s.running == [a, d, c, b]


def test_a_new_sequence_goes_to_the_least_loaded_ready_instance():
    limits = GenerationSettings()
    busy, quiet, down = scheduler(), scheduler(), scheduler()
    busy.running = [sequence(), sequence()]
    busy.enqueue(sequence())
    quiet.running = [sequence()]
    assert place([busy, quiet, down], [True, True, False], limits, "m/1") == 1
    # None ready: the sequence waits on the least loaded instance for it to come back.
    assert place([busy, quiet, down], [False, False, False], limits, "m/1") == 2


def test_past_max_waiting_a_new_sequence_is_refused_with_overloaded():
    limits = GenerationSettings(max_waiting=3)
    one, two = scheduler(max_waiting=3), scheduler(max_waiting=3)
    one.enqueue(sequence())
    two.enqueue(sequence())
    one.running = [sequence() for _ in range(10)]  # running rows do not count, only the waiting
    assert place([one, two], [True, True], limits, "m/1") == 1
    two.enqueue(sequence())
    with pytest.raises(Overloaded, match="3 sequences waiting"):
        place([one, two], [True, True], limits, "m/1")


@pytest.mark.parametrize("finished, waiting, running, closing, refill_wait, wait", [
    (True, False, True, False, 0.01, 0.01),   # rows freed, others still run: wait for a request to take them
    (False, False, True, False, 0.01, 0.0),   # nothing finished: no row to fill
    (True, True, True, False, 0.01, 0.0),     # requests wait already: they take the rows at once
    (True, False, False, False, 0.01, 0.0),   # nothing runs: the loop idles until an arrival anyway
    (True, False, True, True, 0.01, 0.0),     # closing
    (True, False, True, False, 0.0, 0.0),     # refill wait off
])
def test_the_refill_wait_follows_only_a_step_that_freed_rows(finished, waiting, running, closing, refill_wait, wait):
    s = scheduler(refill_wait=refill_wait)
    if waiting:
        s.enqueue(sequence())
    if running:
        s.running = [sequence()]
    assert s.refill_wait(finished, closing) == wait


def test_closing_stops_every_sequence_and_empties_the_queue():
    s = scheduler()
    waiting, admitting, running = sequence(), sequence(), sequence()
    s.enqueue(waiting)
    s.admitting = [admitting]
    s.running = [running]
    assert s.close() == [waiting, admitting, running]
    assert all(seq.stop_requested for seq in (waiting, admitting, running))
    assert not s.waiting
    assert s.drop_all() == [running, admitting]
    assert s.idle and s.load == 0
