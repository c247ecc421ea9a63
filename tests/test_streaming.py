"""Streaming text-generation: deltas, the last message, cancellation, deadlines and slow readers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from pipeserve.client import aio, pipeline
from pipeserve.server.generation.detokenizer import IncrementalDetokenizer
from pipeserve.v1 import text_generation_pb2 as pb

from tests.conftest import server_settings
from tests.generation_helpers import PROMPTS, Reference, params, statistics, stub, wait_until
from tests.model_folders import add_model
from tests.server_harness import ServerThread

MODEL = "gpt2"
NON_ASCII = "Grüße aus Köln: naïve café, 日本語のテキスト, русский текст, emoji 🙂🚀 and math ∑∞."


@pytest.fixture(scope="module")
def reference(model_repository) -> Reference:
    return Reference(model_repository / MODEL)


@pytest.fixture(scope="module")
def gen(target):
    with pipeline("text-generation", target=target) as remote:
        yield remote


def idle(target: str, model: str = MODEL) -> bool:
    return statistics(target, model).active_sequences == 0


def test_the_stream_carries_the_tokens_the_text_and_at_the_end_why_and_how_many(gen, reference):
    events = list(gen.stream(PROMPTS[1], max_new_tokens=10, do_sample=False))
    unary = gen(PROMPTS[1], max_new_tokens=10, do_sample=False, return_full_text=False)[0]["generated_text"]
    tokens = [t for e in events for t in e.token_ids]
    assert tokens == reference.generate(PROMPTS[1], max_new_tokens=10, do_sample=False)
    assert "".join(e.text for e in events) == reference.text(tokens) == unary
    *middle, last = events
    assert all(e.finish_reason is None and e.usage is None for e in middle)
    assert last.finish_reason == "length"
    assert last.usage == {"prompt_tokens": len(reference.ids(PROMPTS[1])), "generated_tokens": 10}
    assert 0 < last.time_to_first_token < 30


def test_text_deltas_hold_back_partial_characters_and_add_up_to_the_text(reference):
    # Byte-level BPE: many of these tokens are pieces of one UTF-8 character.
    ids = reference.ids(NON_ASCII)
    assert len(ids) > len(NON_ASCII.split())
    text = IncrementalDetokenizer(reference.text)
    deltas = [text.push(token) for token in ids]
    deltas.append(text.flush())
    assert "".join(deltas) == NON_ASCII
    assert not any("\ufffd" in d for d in deltas)
    assert any(d == "" for d in deltas)  # a token that ends inside a character waits for the next


def test_streamed_non_ascii_text_adds_up_to_the_decoded_tokens(gen, reference):
    found_multibyte = False
    for seed in range(12):
        events = list(gen.stream(NON_ASCII, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0, seed=seed))
        tokens = [t for e in events for t in e.token_ids]
        streamed = "".join(e.text for e in events)
        assert streamed == reference.text(tokens)
        found_multibyte |= any(ord(c) > 127 and c != "\ufffd" for e in events for c in e.text)
    assert found_multibyte, "no sampled stream held a multi-byte character"


async def _aio_stream_then_leave(target: str) -> int:
    remote = aio.pipeline("text-generation", target=target)
    received = 0
    async with contextlib.aclosing(remote.stream(PROMPTS[0], max_new_tokens=400, do_sample=False)) as events:
        async for _ in events:
            received += 1
            if received == 3:
                break
    await remote.close()
    return received


def test_leaving_an_asyncio_stream_early_stops_the_sequence_and_frees_its_slot(target):
    before = statistics(target, MODEL).generated_tokens
    assert asyncio.run(_aio_stream_then_leave(target)) == 3
    wait_until(lambda: idle(target), what="the active count returning to zero")
    assert statistics(target, MODEL).generated_tokens - before < 400


def test_breaking_out_of_a_stream_stops_the_sequence_and_frees_its_slot(gen, target):
    before = statistics(target, MODEL).generated_tokens
    for i, _ in enumerate(gen.stream(PROMPTS[0], max_new_tokens=400, do_sample=False)):
        if i == 2:
            break
    wait_until(lambda: idle(target), what="the active count returning to zero")
    assert statistics(target, MODEL).generated_tokens - before < 400


def test_a_deadline_ends_the_stream_and_frees_its_slot(gen, target):
    with pytest.raises(grpc.RpcError) as caught:
        for _ in gen.stream(PROMPTS[0], max_new_tokens=500, do_sample=False, timeout=0.2):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: idle(target), what="the active count returning to zero")


# -- a server of its own: a tiny stream buffer and two rows per instance ----------------------------

@pytest.fixture(scope="module")
def small_engine(tmp_path_factory, model_repository):
    repo = tmp_path_factory.mktemp("streaming_repository")
    add_model(repo, "gpt2-small-buffer", source=MODEL, task="text-generation",
              extra="generation { max_stream_buffer: 4 max_concurrent_sequences: 2 }")
    add_model(repo, "gpt2-refill", source=MODEL, task="text-generation",
              extra=f"generation {{ refill_wait_microseconds: {int(REFILL_WAIT * 1e6)} }}")
    running = ServerThread(server_settings(repo)).start()
    yield running
    running.stop()


def test_a_slow_reader_gets_resource_exhausted_and_the_batch_goes_on(small_engine):
    target, model = small_engine.target, "gpt2-small-buffer"
    # A reader whose flow-control window holds a couple of messages, and who does not read yet.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(target, options=options) as channel:
        slow = stub(channel).GenerateStream(pb.GenerateStreamRequest(
            model=model, input=PROMPTS[0], parameters=params(max_new_tokens=400, do_sample=False, logprobs=True,
                                                             top_logprobs=20)))
        # The stream overflows its buffer and leaves the batch: the slot is free again.
        wait_until(lambda: statistics(target, model).generated_tokens > 0 and idle(target, model),
                   what="the slow stream leaving the batch")
        with grpc.insecure_channel(target) as other:
            # Meanwhile a reader that keeps up is served in full.
            fast = [m for m in stub(other).GenerateStream(pb.GenerateStreamRequest(
                model=model, input=PROMPTS[1], parameters=params(max_new_tokens=20, do_sample=False)))]
        assert fast[-1].finish_reason == pb.FINISH_REASON_LENGTH
        received = 0
        with pytest.raises(grpc.RpcError) as caught:
            for message in slow:
                received += len(message.token_ids)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_stream_buffer" in caught.value.details()
    assert 0 < received < 400


def test_sequences_beyond_the_rows_wait_and_a_cancelled_waiting_one_leaves_at_once(small_engine):
    target, model = small_engine.target, "gpt2-small-buffer"

    async def run():
        async with grpc.aio.insecure_channel(target) as channel:
            s = stub(channel)
            long = [s.GenerateStream(pb.GenerateStreamRequest(model=model, input=p, parameters=params(
                max_new_tokens=300, do_sample=False))) for p in PROMPTS[:2]]
            for call in long:  # both rows taken
                await call.read()
            waiting = s.GenerateStream(pb.GenerateStreamRequest(model=model, input=PROMPTS[2], parameters=params(
                max_new_tokens=5, do_sample=False)))
            await asyncio.to_thread(wait_until, lambda: statistics(target, model).active_sequences == 3)
            waiting.cancel()
            await asyncio.to_thread(wait_until, lambda: statistics(target, model).active_sequences == 2)
            for call in long:
                call.cancel()
            await asyncio.to_thread(wait_until, lambda: idle(target, model))
            # Then a new sequence gets a row and runs to the end.
            done = [m async for m in s.GenerateStream(pb.GenerateStreamRequest(
                model=model, input=PROMPTS[3], parameters=params(max_new_tokens=5, do_sample=False)))]
            return done[-1].usage.generated_tokens

    assert asyncio.run(run()) == 5


REFILL_WAIT = 1.5  # seconds: far longer than any step of the tiny model, so that the wait shows


def test_after_a_sequence_finishes_the_engine_waits_for_a_request_to_take_its_row(small_engine):
    """refill_wait: after a step in which a sequence finished, the next step waits for a new
    request to join it (up to the configured time) and goes as soon as one arrives."""
    target, model = small_engine.target, "gpt2-refill"

    def request(prompt: str, tokens: int) -> pb.GenerateStreamRequest:
        return pb.GenerateStreamRequest(model=model, input=prompt, parameters=params(max_new_tokens=tokens,
                                                                                      do_sample=False))

    async def pause_of_a_running_stream(send_next: bool) -> float:
        """Seconds from a short stream's end to the next token of a long stream running beside it."""
        async with grpc.aio.insecure_channel(target) as channel:
            s = stub(channel)
            running = s.GenerateStream(request(PROMPTS[0], 400))
            await running.read()
            arrivals: list[float] = []

            async def read() -> None:
                while (await running.read()) is not grpc.aio.EOF:
                    arrivals.append(time.monotonic())

            reader = asyncio.create_task(read())
            short = [m async for m in s.GenerateStream(request(PROMPTS[1], 3))]
            ended = time.monotonic()
            assert short[-1].finish_reason == pb.FINISH_REASON_LENGTH
            if send_next:
                assert (await s.Generate(pb.GenerateRequest(model=model, inputs=[PROMPTS[2]], parameters=params(
                    max_new_tokens=2, do_sample=False)))).results
            await asyncio.to_thread(wait_until, lambda: any(t > ended for t in arrivals), REFILL_WAIT * 3,
                                    "the running stream's next token")
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            return min(t for t in arrivals if t > ended) - ended

    assert asyncio.run(pause_of_a_running_stream(send_next=False)) > REFILL_WAIT * 0.6  # nobody came: it waited
    assert asyncio.run(pause_of_a_running_stream(send_next=True)) < REFILL_WAIT * 0.4  # the next request ended it
    wait_until(lambda: idle(target, model), what="the refill model to be idle")


def test_an_engine_that_closes_ends_running_streams_with_cancelled(small_engine):
    # Runs last: the model stops taking sequences (as when it unloads and its grace is over).
    target, model = small_engine.target, "gpt2-small-buffer"
    with grpc.insecure_channel(target) as channel:
        call = stub(channel).GenerateStream(pb.GenerateStreamRequest(
            model=model, input=PROMPTS[0], parameters=params(max_new_tokens=400, do_sample=False)))
        first = next(call)
        engine = small_engine.server.registry.get(model).runtime.engine
        small_engine.run(engine.close(grace=0))
        rest = list(call)
        tokens = len(first.token_ids) + sum(len(m.token_ids) for m in rest)
        assert rest[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        assert rest[-1].usage.generated_tokens >= tokens and tokens < 400
        expect_unavailable = stub(channel).GenerateStream(pb.GenerateStreamRequest(model=model, input="Hello"))
        with pytest.raises(grpc.RpcError) as caught:
            list(expect_unavailable)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert idle(target, model)
