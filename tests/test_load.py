"""Load: a burst far over a model's queue is answered in full (a result or RESOURCE_EXHAUSTED), none
hangs, and the server's memory stays bounded; concurrent token streams, half cancelled midway,
leave no sequence running and the rest come out exactly as they do alone.

The server runs as a real process so that its resident memory can be read (psutil).
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import psutil
import pytest

from pipeserve.v1 import model_service_pb2 as ms_pb
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_classification_pb2 as tc_pb
from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
from tests.conftest import REPOSITORY
from tests.server_harness import ServerProcess

# A server process of its own and a few thousand calls: tens of seconds on a small CPU.
pytestmark = pytest.mark.slow

QUEUE_SIZE = 64
# Inputs per request, each run alone (max_batch_size 1): the model takes several times longer per
# request than the server takes to accept one, so a burst must overrun the queue on any machine.
INPUTS_PER_REQUEST = 4
BURST = 2_000
BURST_TIMEOUT_S = 180
# Resident memory the server may gain over a burst after a warm-up burst: room for allocator
# noise, far less than a leak of a few kilobytes per request would take.
RSS_GROWTH_LIMIT = 48 << 20
STREAMS = 200
STREAM_TOKENS = 12
PROMPTS = ["Once upon a time", "The weather today", "In a small village", "My favourite food is"]


@pytest.fixture(scope="module")
def loaded(model_repository, tmp_path_factory):
    """A server with a small-queue classifier and the text generator, both from the default
    repository's files (an absolute source.path), in its own process."""
    repo = tmp_path_factory.mktemp("load-repo")
    (repo / "small-queue").mkdir()
    (repo / "small-queue" / "config.pbtxt").write_text(
        f'name: "small-queue"\ntask: "text-classification"\nsource {{ path: "{REPOSITORY / "tiny-classifier"}" }}\n'
        f"max_batch_size: 1\ndynamic_batching {{ max_queue_size: {QUEUE_SIZE} }}\n")
    generation = (REPOSITORY / "gpt2" / "config.pbtxt").exists()
    if generation:
        (repo / "gpt2").mkdir()
        (repo / "gpt2" / "config.pbtxt").write_text(
            f'name: "gpt2"\ntask: "text-generation"\nsource {{ path: "{REPOSITORY / "gpt2"}" }}\n'
            "max_batch_size: 32\ngeneration { max_concurrent_sequences: 32 }\n")
    server = ServerProcess(repo, "--grace-period", "5").start()
    try:
        yield server
    finally:
        server.stop()


def _rss(server: ServerProcess) -> int:
    assert server.proc is not None
    return psutil.Process(server.proc.pid).memory_info().rss


async def _statistics(channel: grpc.aio.Channel, model: str) -> ms_pb.ModelStatistics:
    reply = await ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(name=model), timeout=10)
    return reply.models[0]


async def _burst(target: str, n: int) -> collections.Counter:
    """n concurrent calls from one event loop; counts the outcomes, checking each one."""
    async with grpc.aio.insecure_channel(target) as channel:
        classify = tc_grpc.TextClassificationServiceStub(channel).Classify

        async def one(i: int) -> str:
            try:
                inputs = [f"request number {i}, input {k}" for k in range(INPUTS_PER_REQUEST)]
                reply = await classify(tc_pb.ClassifyRequest(model="small-queue", inputs=inputs), timeout=BURST_TIMEOUT_S)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (error.code(), error.details())
                assert f"(limit {QUEUE_SIZE}); retry with backoff" in error.details(), error.details()
                return "RESOURCE_EXHAUSTED"
            assert len(reply.results) == INPUTS_PER_REQUEST
            assert all(r.labels[0].label in ("NEGATIVE", "POSITIVE") for r in reply.results)
            return "OK"

        outcomes = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), BURST_TIMEOUT_S)
        stats = await _statistics(channel, "small-queue")
        assert (stats.in_flight, stats.queued) == (0, 0), stats
    return collections.Counter(outcomes)


def test_a_burst_over_the_queue_is_answered_in_full_with_bounded_memory(loaded):
    warm = asyncio.run(_burst(loaded.target, BURST // 2))
    assert sum(warm.values()) == BURST // 2
    before = _rss(loaded)
    outcomes = asyncio.run(_burst(loaded.target, BURST))
    after = _rss(loaded)
    assert sum(outcomes.values()) == BURST and set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert outcomes["OK"] >= QUEUE_SIZE // INPUTS_PER_REQUEST, outcomes
    assert outcomes["RESOURCE_EXHAUSTED"] > 0, f"a burst of {BURST} never filled a queue of {QUEUE_SIZE}: {outcomes}"
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew {(after - before) >> 20} MiB over {BURST} requests"

    async def counters():
        async with grpc.aio.insecure_channel(loaded.target) as channel:
            return await _statistics(channel, "small-queue")

    stats = asyncio.run(counters())
    assert stats.success_count == warm["OK"] + outcomes["OK"]
    assert stats.rejected_count == warm["RESOURCE_EXHAUSTED"] + outcomes["RESOURCE_EXHAUSTED"]


# -- streams ----------------------------------------------------------------------------------------------


def _generation():
    try:
        from pipeserve.v1 import text_generation_pb2, text_generation_pb2_grpc
    except ImportError:
        pytest.skip("no text-generation service yet")
    return text_generation_pb2, text_generation_pb2_grpc


async def _stream(stub, pb, prompt: str, cancel_after: int | None) -> tuple[list[int], bool]:
    """Reads a greedy stream; cancels it after `cancel_after` messages. (token ids, finished)."""
    request = pb.GenerateStreamRequest(model="gpt2", input=prompt, parameters=pb.GenerationParameters(
        max_new_tokens=STREAM_TOKENS, do_sample=False))
    call = stub.GenerateStream(request, timeout=BURST_TIMEOUT_S)
    tokens: list[int] = []
    messages = 0
    async for message in call:
        tokens += message.token_ids
        messages += 1
        if message.finish_reason:
            return tokens, True
        if cancel_after is not None and messages >= cancel_after:
            call.cancel()
            return tokens, False
    return tokens, False


def test_concurrent_streams_half_cancelled_leave_nothing_running(loaded):
    pb, pb_grpc = _generation()

    async def run() -> None:
        async with grpc.aio.insecure_channel(loaded.target) as channel:
            stub = pb_grpc.TextGenerationServiceStub(channel)
            reference = {p: (await _stream(stub, pb, p, None))[0] for p in PROMPTS}
            assert all(len(tokens) == STREAM_TOKENS for tokens in reference.values()), reference
            jobs = [(PROMPTS[i % len(PROMPTS)], 2 if i % 2 else None) for i in range(STREAMS)]
            results = await asyncio.wait_for(
                asyncio.gather(*(_stream(stub, pb, prompt, cancel) for prompt, cancel in jobs)), BURST_TIMEOUT_S)
            for (prompt, cancel), (tokens, finished) in zip(jobs, results):
                if finished:
                    assert tokens == reference[prompt], (prompt, tokens, reference[prompt])
                else:
                    assert cancel is not None and tokens == reference[prompt][: len(tokens)], (prompt, tokens)
            cancelled = sum(not finished for _, finished in results)
            assert cancelled >= STREAMS // 4, f"only {cancelled} streams were still running when cancelled"
            assert all(finished for (_, cancel), (_, finished) in zip(jobs, results) if cancel is None)
            # Cancellation reaches the server after the client has moved on: wait for it there.
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                stats = await _statistics(channel, "gpt2")
                if (stats.active_sequences, stats.in_flight) == (0, 0):
                    break
                assert asyncio.get_running_loop().time() < deadline, f"sequences still active: {stats}"
                await asyncio.sleep(0.05)

    asyncio.run(run())
