"""Faults: a backend instance that raises or dies mid-batch fails only that batch's requests with
a clear status, and a dead one is loaded again; SIGTERM under load drains without losing a call.

The faults come from a real backend plugin (tests/fault_backend.py, registered by entry point
from a dist-info written here): the eager backend, plus trigger tokens that make it raise or die.
The Triton backend's outage and return is tested with the Triton backend (tests/test_triton*).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import signal
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoTokenizer

from pipeserve.backends import registry as backend_registry
from pipeserve.v1 import model_service_pb2 as ms_pb
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_classification_pb2 as tc_pb
from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
from pipeserve.v1 import text_generation_pb2 as tg_pb
from pipeserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests.conftest import REPOSITORY, server_settings
from tests.fault_backend import FaultInjectingBackend, install_plugin
from tests.model_folders import link_files
from tests.server_harness import ServerProcess, ServerThread

SOURCE = REPOSITORY / "tiny-classifier"
GENERATOR = REPOSITORY / "gpt2"
RAISE_WORD, DIE_WORD = "explode", "crash"


@functools.lru_cache
def _token(word: str, source=SOURCE) -> int:
    """The word's token id (its first, where the tokenizer splits it)."""
    return AutoTokenizer.from_pretrained(str(source))(word, add_special_tokens=False)["input_ids"][0]


def _faulty_model(repo, name: str, extra: str = "", source=SOURCE, task: str = "text-classification") -> None:
    folder = repo / name
    link_files(source, folder)
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\ntask: "{task}"\nbackend: "faulty"\n'
        f'backend_parameters {{ key: "raise_on_token" value: "{_token(RAISE_WORD, source)}" }}\n'
        f'backend_parameters {{ key: "die_on_token" value: "{_token(DIE_WORD, source)}" }}\n{extra}\n')


@pytest.fixture(scope="module")
def faulty(model_repository, tmp_path_factory):
    """A server whose models run on the fault-injecting backend plugin."""
    plugin = install_plugin(tmp_path_factory.mktemp("fault-plugin"))
    sys.path.insert(0, str(plugin))
    importlib.invalidate_caches()
    assert "faulty" in backend_registry.backend_names()
    repo = tmp_path_factory.mktemp("fault-repo")
    # One input per batch, so that "that batch's requests" is exactly the request that held the trigger.
    _faulty_model(repo, "raising", "max_batch_size: 1")
    _faulty_model(repo, "dying", "max_batch_size: 1\ninstance_group [ { count: 1 kind: KIND_CPU } ]")
    _faulty_model(repo, "stays-dead", "instance_group [ { count: 1 kind: KIND_CPU } ]")
    _faulty_model(repo, "dying-generator", "instance_group [ { count: 1 kind: KIND_CPU } ]", GENERATOR,
                  "text-generation")
    server = ServerThread(server_settings(repo)).start()
    try:
        yield server
    finally:
        server.stop()
        FaultInjectingBackend.reloads_allowed.set()
        sys.path.remove(str(plugin))
        importlib.invalidate_caches()


def _stats(target: str, model: str) -> ms_pb.ModelStatistics:
    with grpc.insecure_channel(target) as channel:
        reply = ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(name=model), timeout=10)
    return reply.models[0]


async def _classify_all(target: str, model: str, texts: list[str]) -> list[tuple[grpc.StatusCode, str]]:
    """Sends every text as its own request at once; (status, details or top label) per request."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tc_grpc.TextClassificationServiceStub(channel)

        async def one(text: str) -> tuple[grpc.StatusCode, str]:
            try:
                reply = await stub.Classify(tc_pb.ClassifyRequest(model=model, inputs=[text]), timeout=60)
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details()
            return grpc.StatusCode.OK, reply.results[0].labels[0].label

        return await asyncio.gather(*(one(t) for t in texts))


def _wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    """Polls a server-side fact that has no event to wait on over the wire."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_batch_that_raises_fails_only_its_requests_with_internal(faulty):
    texts = [f"a normal sentence number {i}" for i in range(12)]
    texts.insert(5, f"this will {RAISE_WORD} now")
    results = asyncio.run(_classify_all(faulty.target, "raising", texts))
    failed = [(text, code, details) for text, (code, details) in zip(texts, results) if code != grpc.StatusCode.OK]
    assert len(failed) == 1 and RAISE_WORD in failed[0][0], failed
    _, code, details = failed[0]
    assert code == grpc.StatusCode.INTERNAL
    assert "model raising/1 failed while running the batch: RuntimeError: injected fault" in details
    stats = _stats(faulty.target, "raising")
    assert stats.instance_restarts == 0, "an instance that merely raised was replaced"
    assert (stats.in_flight, stats.queued) == (0, 0)
    assert asyncio.run(_classify_all(faulty.target, "raising", ["still fine"]))[0][0] == grpc.StatusCode.OK


def test_a_dead_instance_fails_its_batch_unavailable_and_is_loaded_again(faulty):
    loads_before = FaultInjectingBackend.loads["dying"]
    # One instance, one input per batch: whatever queued behind the poisoned request must be
    # served by the replacement, and what ran before it was served already.
    texts = [f"the worker will {DIE_WORD}"] + [f"a request behind it {i}" for i in range(20)]
    results = asyncio.run(_classify_all(faulty.target, "dying", texts))
    assert results[0][0] == grpc.StatusCode.UNAVAILABLE, results[0]
    assert "model dying/1 instance 0 died while running the batch" in results[0][1]
    assert "worker crashed on a poisoned batch" in results[0][1]
    assert all(code == grpc.StatusCode.OK for code, _ in results[1:]), results[1:]
    # The requests are sent at once and may reach the server in any order: where the poisoned one
    # ran last, nothing waited for the replacement, which may still be loading now.
    _wait_for(lambda: _stats(faulty.target, "dying").instance_restarts == 1, what="the instance to come back")
    stats = _stats(faulty.target, "dying")
    assert FaultInjectingBackend.loads["dying"] == loads_before + 1
    assert (stats.in_flight, stats.queued) == (0, 0)


async def _generate_all(target: str, model: str, prompts: list[str], new_tokens: int,
                        last_joins_running: bool = False) -> list[tuple[grpc.StatusCode, str, int]]:
    """Streams every prompt at once, or with `last_joins_running` the last one only once every other
    has its first token (all of them running); (status, details, tokens received) per prompt."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tg_grpc.TextGenerationServiceStub(channel)

        async def one(prompt: str, first: asyncio.Event | None) -> tuple[grpc.StatusCode, str, int]:
            tokens = 0
            request = tg_pb.GenerateStreamRequest(model=model, input=prompt, parameters=tg_pb.GenerationParameters(
                max_new_tokens=new_tokens, do_sample=False))
            try:
                async for message in stub.GenerateStream(request, timeout=60):
                    tokens += len(message.token_ids)
                    if first is not None:
                        first.set()
            except grpc.aio.AioRpcError as error:
                return error.code(), error.details(), tokens
            finally:
                if first is not None:
                    first.set()  # a stream that ended without a token holds nobody up (its result tells)
            return grpc.StatusCode.OK, "", tokens

        firsts = [asyncio.Event() for _ in prompts[:-1]]
        running = [asyncio.create_task(one(p, first)) for p, first in zip(prompts[:-1], firsts)]
        if last_joins_running:
            await asyncio.gather(*(first.wait() for first in firsts))
        return [*await asyncio.gather(*running, one(prompts[-1], None))]


def test_a_generation_instance_that_dies_fails_its_step_unavailable_and_is_loaded_again(faulty):
    """A poisoned prompt kills the instance in the step it joins: the sequences in that step end
    with UNAVAILABLE (their keys and values went with the instance), the instance is loaded again,
    and the next streams are served by the replacement."""
    loads_before = FaultInjectingBackend.loads["dying-generator"]
    tokenizer = AutoTokenizer.from_pretrained(str(GENERATOR))
    fine, poison = ["Once upon a time", "The weather today"], f"{DIE_WORD} goes the worker"
    assert not any(_token(DIE_WORD, GENERATOR) in tokenizer(p)["input_ids"] for p in fine)
    assert _token(DIE_WORD, GENERATOR) in tokenizer(poison)["input_ids"]

    async def run():
        return await _generate_all(faulty.target, "dying-generator", [*fine, poison], 200, last_joins_running=True)

    results = asyncio.run(run())
    poisoned = results[-1]
    assert poisoned[0] == grpc.StatusCode.UNAVAILABLE, poisoned
    assert "the instance died" in poisoned[1] and "worker crashed on a poisoned batch" in poisoned[1]
    for code, details, tokens in results[:-1]:  # they ran beside it: they end with it, mid-stream
        assert code == grpc.StatusCode.UNAVAILABLE and 0 < tokens < 200, (code, details, tokens)
    _wait_for(lambda: _stats(faulty.target, "dying-generator").instance_restarts == 1,
              what="the generation instance to come back")
    assert FaultInjectingBackend.loads["dying-generator"] == loads_before + 1
    after = asyncio.run(_generate_all(faulty.target, "dying-generator", fine, 8))
    assert after == [(grpc.StatusCode.OK, "", 8)] * len(fine)
    assert _stats(faulty.target, "dying-generator").active_sequences == 0


def test_a_replacement_that_fails_to_load_is_retried_and_work_fails_fast_meanwhile(faulty):
    FaultInjectingBackend.reloads_allowed.clear()
    try:
        died = asyncio.run(_classify_all(faulty.target, "stays-dead", [f"{DIE_WORD} it"]))[0]
        assert died[0] == grpc.StatusCode.UNAVAILABLE
        _wait_for(lambda: FaultInjectingBackend.loads["stays-dead"] >= 2, what="a first reload attempt")
        # No instance can serve: requests are refused at once, not left hanging.
        code, details = asyncio.run(_classify_all(faulty.target, "stays-dead", ["anyone there?"]))[0]
        assert code == grpc.StatusCode.UNAVAILABLE and "no ready instance" in details, details
    finally:
        FaultInjectingBackend.reloads_allowed.set()
    _wait_for(lambda: _stats(faulty.target, "stays-dead").instance_restarts == 1, what="the instance to come back")
    assert asyncio.run(_classify_all(faulty.target, "stays-dead", ["back again"]))[0][0] == grpc.StatusCode.OK
    stats = _stats(faulty.target, "stays-dead")
    assert (stats.in_flight, stats.queued) == (0, 0)


# -- SIGTERM under load ---------------------------------------------------------------------------------------

LOAD_CALLS = 32
GRACE_S = 60


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def _statistics(channel: grpc.aio.Channel, model: str) -> ms_pb.ModelStatistics:
    reply = await ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(name=model), timeout=5)
    return reply.models[0]


@pytest.mark.slow
def test_sigterm_under_load_drains_every_call_in_flight(model_repository):
    """Readiness flips first, every call in flight completes, new calls get UNAVAILABLE, and the
    process exits 0 once the last call is answered, well within the grace period."""
    server = ServerProcess(model_repository, "--grace-period", str(GRACE_S), "--load-models", "minilm")
    server.start()
    try:
        asyncio.run(_drain_under_load(server))
        started = time.monotonic()
        assert server.wait(GRACE_S) == 0
        assert time.monotonic() - started < GRACE_S
    finally:
        server.stop()
    assert "draining" in server.log()


async def _drain_under_load(server: ServerProcess) -> None:
    from pipeserve.v1 import feature_extraction_pb2 as fe_pb
    from pipeserve.v1 import feature_extraction_pb2_grpc as fe_grpc

    # A few batches of real work for MiniLM: seconds on a small CPU, so that the drain has work to wait for.
    text = "a sentence long enough to give the model some work to do on every call " * 3
    async with grpc.aio.insecure_channel(server.target) as channel:
        embed = fe_grpc.FeatureExtractionServiceStub(channel).Embed
        calls = [asyncio.ensure_future(embed(fe_pb.EmbedRequest(inputs=[text] * 2, pooling=fe_pb.POOLING_MEAN), timeout=120))
                 for _ in range(LOAD_CALLS)]
        # Every call has reached the model (in flight or done) before the signal.
        while True:
            stats = await _statistics(channel, "minilm")
            if stats.in_flight + stats.success_count >= LOAD_CALLS:
                break
            await asyncio.sleep(0.01)
        assert stats.in_flight > LOAD_CALLS // 2, f"the load finished too early to test a drain: {stats}"
        server.signal(signal.SIGTERM)
        while await _health(channel, "readiness") != health_pb2.HealthCheckResponse.NOT_SERVING:
            await asyncio.sleep(0.01)
        assert await _health(channel, "liveness") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await embed(fe_pb.EmbedRequest(inputs=["a new call"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
        still_running = sum(not c.done() for c in calls)
        replies = await asyncio.gather(*calls)
        assert still_running > 0, "every call had finished before the new call was refused"
        assert all(len(r.embeddings) == 2 and len(r.embeddings[0].values) == 384 for r in replies)
