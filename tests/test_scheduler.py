"""The scheduler, over the wire: instance groups, queue limits, priorities, deadlines, cancellation,
statistics, and an event loop that stays free while a model is saturated.

One server serves a repository of small configs that all point at the tiny-classifier's files.
Models behind the "gated" test backend (tests/gated_backend.py) hold their batches until the
test opens the gate, so what is queued and what runs is known, not guessed from timings.
"""

from __future__ import annotations

import asyncio
import random
import statistics as stats_lib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeserve.server.scheduling.cost import BatchCostModel
from pipeserve.server.scheduling.instances import (
    available_cores,
    cpu_threads_per_instance,
    lone_instance_threads,
    plan_devices,
)
from pipeserve.server.repository.model_settings import InstanceGroupSettings
from pipeserve.v1 import model_service_pb2 as ms
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_classification_pb2 as tc
from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
from tests import gated_backend
from tests.conftest import REPOSITORY, server_settings
from tests.server_harness import ServerProcess, ServerThread

WORDS = "the quick brown fox jumps over a lazy dog while seven bright stars watch quietly".split()


def text(words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(words))


def write_model(repo: Path, name: str, source: Path, body: str = "", versions: tuple[int, ...] = ()) -> None:
    folder = repo / name
    folder.mkdir()
    for version in versions:
        (folder / str(version)).mkdir()
    (folder / "config.pbtxt").write_text(
        f'name: "{name}"\ntask: "text-classification"\nsource {{ path: "{source}" }}\n{body}\n')


@pytest.fixture(scope="module")
def tiny_classifier() -> Path:
    from pipeserve.model_builder import build_default_repository

    build_default_repository(REPOSITORY, only={"tiny-classifier"})
    return REPOSITORY / "tiny-classifier"


MODELS = {
    # The same weights batched and not: results must not differ.
    "batched": 'max_batch_size: 32 dynamic_batching { max_queue_delay_microseconds: 2000 }',
    "unbatched": "max_batch_size: 1",
    "gated-merge": 'backend: "gated" max_batch_size: 8 dynamic_batching { }',
    "gated-group": 'backend: "gated" max_batch_size: 4 dynamic_batching { }',
    "gated-queue": 'backend: "gated" max_batch_size: 1 dynamic_batching { max_queue_size: 2 }',
    "gated-deadline": 'backend: "gated" max_batch_size: 8 dynamic_batching { }',
    "gated-cancel": 'backend: "gated" max_batch_size: 8 dynamic_batching { }',
    "gated-priority": 'backend: "gated" max_batch_size: 1 '
                      'dynamic_batching { priority_levels: 2 default_priority_level: 2 }',
    "gated-instances": 'backend: "gated" max_batch_size: 8 dynamic_batching { } '
                       'instance_group [ { count: 2 kind: KIND_CPU } ]',
    "one-thread": 'max_batch_size: 8 backend_parameters { key: "intra_op_threads" value: "1" }',
    # Waits up to 10 s for company: a batch goes early only because it is full or preferred.
    "delayed": 'max_batch_size: 4 dynamic_batching { max_queue_delay_microseconds: 10000000 }',
    "preferred": 'max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 10000000 '
                 'preferred_batch_size: [ 3 ] }',
    "short-delay": 'max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 300000 }',
    "versions": 'max_batch_size: 8 dynamic_batching { } version_policy { all { } }',
    "on-gpu": 'instance_group [ { kind: KIND_GPU } ]',
    # Linear layers on numpy's BLAS (backends/cpu_matmul.py), and a library that does not exist.
    "numpy-matmul": 'max_batch_size: 8 dynamic_batching { } backend_parameters { key: "cpu_matmul" value: "numpy" }',
    "bad-matmul": 'backend_parameters { key: "cpu_matmul" value: "mkl" }',
}


@pytest.fixture(scope="module")
def sched(tmp_path_factory: pytest.TempPathFactory, tiny_classifier: Path):
    plugins = gated_backend.install_plugin(tmp_path_factory.mktemp("plugins"))
    sys.path.insert(0, str(plugins))
    repo = tmp_path_factory.mktemp("scheduler-repo")
    for name, body in MODELS.items():
        write_model(repo, name, tiny_classifier, body, versions=(1, 2) if name == "versions" else ())
    server = ServerThread(server_settings(repo)).start()
    yield server
    server.stop()
    sys.path.remove(str(plugins))


def client(target: str) -> grpc.Channel:
    # Its own connection: a distinct client, not a second call on a shared one.
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def classify_stub(channel: grpc.Channel) -> tc_grpc.TextClassificationServiceStub:
    return tc_grpc.TextClassificationServiceStub(channel)


def request(model: str, *inputs: str, version: int = 0) -> tc.ClassifyRequest:
    return tc.ClassifyRequest(inputs=list(inputs), model=model, model_version=version, top_k=0)


def statistics(target: str, model: str, version: int = 1) -> ms.ModelStatistics:
    with grpc.insecure_channel(target) as channel:
        found = ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest(name=model))
    return next(m for m in found.models if m.version == version)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls observable server state (its statistics) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def scores(response: tc.ClassifyResponse) -> list[dict[str, float]]:
    return [{ls.label: ls.score for ls in r.labels} for r in response.results]


class Held:
    """A gated model whose instance is busy with one request: what is sent next stays queued."""

    def __init__(self, target: str, model: str):
        self.target, self.model = target, model
        self.gate = gated_backend.gate(model)

    def __enter__(self) -> Held:
        self.gate.close()
        self.start = len(self.gate.shapes)
        self.channel = client(self.target)
        self.first = classify_stub(self.channel).Classify.future(request(self.model, text(1)), timeout=60)
        self.gate.wait_for_batches(self.start + 1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.open()
        self.first.result()
        self.channel.close()

    def batches(self) -> list[tuple[int, ...]]:
        """Shapes of the batches that reached the model since the holding one."""
        return self.gate.shapes[self.start + 1:]


# -- dynamic batching ------------------------------------------------------------------------------


def test_requests_from_different_clients_merge_into_one_forward_pass(sched: ServerThread) -> None:
    texts = [text(n) for n in (3, 9, 5, 14, 2, 7)]
    channels = [client(sched.target) for _ in texts]
    with Held(sched.target, "gated-merge") as held:
        calls = [classify_stub(ch).Classify.future(request("gated-merge", t), timeout=60) for ch, t in zip(channels, texts)]
        wait_until(lambda: statistics(sched.target, "gated-merge").queued == len(texts), what="all six queued")
    merged = [scores(call.result())[0] for call in calls]
    assert held.batches()[0][0] == len(texts), held.batches()
    stats = statistics(sched.target, "gated-merge")
    assert dict(stats.batch_sizes) == {1: 1, len(texts): 1}
    assert stats.inference_count == 1 + len(texts) and stats.execution_count == 2
    with grpc.insecure_channel(sched.target) as channel:
        alone = [scores(classify_stub(channel).Classify(request("unbatched", t)))[0] for t in texts]
    for got, want in zip(merged, alone):
        assert got.keys() == want.keys()
        for label in want:
            assert got[label] == pytest.approx(want[label], abs=1e-5)
    for ch in channels:
        ch.close()


def test_batched_result_equals_unbatched(sched: ServerThread) -> None:
    texts = [text(n) for n in (1, 40, 8, 23, 2, 17, 31, 5)]
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        batched = scores(stub.Classify(request("batched", *texts)))
        alone = [scores(stub.Classify(request("unbatched", t)))[0] for t in texts]
    assert statistics(sched.target, "batched").batch_sizes[len(texts)] >= 1
    assert set(statistics(sched.target, "unbatched").batch_sizes) == {1}
    for got, want in zip(batched, alone):
        for label in want:
            assert got[label] == pytest.approx(want[label], abs=1e-5)


def test_linear_layers_on_numpys_blas_give_the_same_scores(sched: ServerThread) -> None:
    texts = [text(n) for n in (1, 40, 8, 23)]
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        routed = scores(stub.Classify(request("numpy-matmul", *texts)))
        alone = [scores(stub.Classify(request("unbatched", t)))[0] for t in texts]
    for got, want in zip(routed, alone):
        for label in want:
            assert got[label] == pytest.approx(want[label], abs=1e-5)


def test_an_unknown_cpu_matmul_fails_the_model_with_what_is_allowed(sched: ServerThread) -> None:
    with grpc.insecure_channel(sched.target) as channel:
        listed = ms_grpc.ModelServiceStub(channel).ListModels(ms.ListModelsRequest())
    state = next(m for m in listed.models if m.name == "bad-matmul")
    assert state.state == ms.MODEL_STATE_FAILED
    assert "cpu_matmul must be one of auto, torch, numpy" in state.reason, state.reason


def test_queued_inputs_are_grouped_by_length(sched: ServerThread) -> None:
    # Short and long inputs alternate in the queue; batches of 4 take the four short ones
    # together (the oldest input is short) and then the four long ones: little padding.
    texts = [text(2) if i % 2 == 0 else text(30) for i in range(8)]
    with grpc.insecure_channel(sched.target) as channel:
        with Held(sched.target, "gated-group") as held:
            stub = classify_stub(channel)
            calls = [stub.Classify.future(request("gated-group", texts[0]), timeout=60)]
            wait_until(lambda: statistics(sched.target, "gated-group").queued == 1, what="the oldest queued")
            calls += [stub.Classify.future(request("gated-group", t), timeout=60) for t in texts[1:]]
            wait_until(lambda: statistics(sched.target, "gated-group").queued == 8, what="eight queued")
        for call in calls:
            call.result()
    short, long = held.batches()
    assert short[0] == 4 and long[0] == 4
    assert short[1] < 10 < long[1], held.batches()


def test_the_learned_cost_fills_batches_of_a_cheap_model_and_groups_lengths_for_a_costly_one() -> None:
    rng = random.Random(0)
    sizes = sorted(rng.randint(50, 300) for _ in range(64))
    head = 31
    cheap, costly = BatchCostModel(), BatchCostModel()
    for _ in range(32):
        n, longest = rng.randint(1, 32), rng.randint(50, 300)
        cheap.observe(n, longest, 0.002 + 1e-6 * n * longest)  # a fixed cost per pass dominates
        costly.observe(n, longest, 0.040 + 2e-4 * n * longest)  # padded length dominates
    assert cheap.coefficients and costly.coefficients
    assert costly.coefficients[0] == pytest.approx(0.040, rel=1e-3)
    assert costly.coefficients[1] == pytest.approx(2e-4, rel=1e-3)
    assert cheap.choose(sizes, head, 32)[1] == 32
    start, n = costly.choose(sizes, head, 32)
    window = sizes[start:start + n]
    assert 1 < n < 32 and start <= head < start + n
    assert n * window[-1] - sum(window) < 0.1 * n * window[-1]  # under 10% of the batch is padding


def test_a_full_batch_goes_at_once_without_waiting_the_queue_delay(sched: ServerThread) -> None:
    channels = [client(sched.target) for _ in range(4)]
    started = time.monotonic()
    calls = [classify_stub(ch).Classify.future(request("delayed", text(3 + i)), timeout=60) for i, ch in enumerate(channels)]
    for call in calls:
        call.result()
    assert time.monotonic() - started < 5, "a full batch waited for the 10 s queue delay"
    assert dict(statistics(sched.target, "delayed").batch_sizes) == {4: 1}
    for ch in channels:
        ch.close()


def test_a_preferred_batch_size_goes_at_once_and_the_delay_bounds_the_rest(sched: ServerThread) -> None:
    channels = [client(sched.target) for _ in range(3)]
    started = time.monotonic()
    calls = [classify_stub(ch).Classify.future(request("preferred", text(3 + i)), timeout=60) for i, ch in enumerate(channels)]
    for call in calls:
        call.result()
    assert time.monotonic() - started < 5, "a preferred-size batch waited for the 10 s queue delay"
    assert dict(statistics(sched.target, "preferred").batch_sizes) == {3: 1}

    # Two inputs make no preferred batch: they wait out the 0.3 s delay, then go together.
    started = time.monotonic()
    calls = [classify_stub(ch).Classify.future(request("short-delay", text(3 + i)), timeout=60)
             for i, ch in enumerate(channels[:2])]
    for call in calls:
        call.result()
    assert 0.25 < time.monotonic() - started < 5
    assert dict(statistics(sched.target, "short-delay").batch_sizes) == {2: 1}
    for ch in channels:
        ch.close()


def test_one_client_calling_in_turn_stops_waiting_for_company(sched: ServerThread) -> None:
    # With nothing else in flight, the 0.3 s queue delay could only add latency: after a few
    # requests that each arrived alone, the batcher no longer waits.
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        stub.Classify(request("short-delay", text(4)))  # warm, and the first lone arrival
        latencies = []
        for _ in range(8):
            started = time.monotonic()
            stub.Classify(request("short-delay", text(4)))
            latencies.append(time.monotonic() - started)
    assert stats_lib.median(latencies[-4:]) < 0.15, latencies


# -- queue limits, priorities, deadlines, cancellation -------------------------------------------------


def test_a_full_queue_refuses_at_once_with_resource_exhausted(sched: ServerThread) -> None:
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        with Held(sched.target, "gated-queue"):
            queued = [stub.Classify.future(request("gated-queue", text(2)), timeout=60) for _ in range(2)]
            wait_until(lambda: statistics(sched.target, "gated-queue").queued == 2, what="two queued")
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request("gated-queue", text(2)), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 2
            assert "queued (limit 2)" in refused.value.details()
            with pytest.raises(grpc.RpcError) as too_big:
                stub.Classify(request("gated-queue", *[text(2)] * 3), timeout=30)
            assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for call in queued:
            assert call.result().results
    stats = statistics(sched.target, "gated-queue")
    assert stats.rejected_count == 2 and stats.queued == 0 and stats.success_count == 3


def test_more_urgent_requests_run_first(sched: ServerThread) -> None:
    urgent = [("pipeserve-priority", "1")]
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        with Held(sched.target, "gated-priority") as held:
            # Lengths tell the batches apart: 2 and 3 words at the default level, then 4 urgent.
            calls = []
            for n in (2, 3):
                calls.append(stub.Classify.future(request("gated-priority", text(n)), timeout=60))
                wait_until(lambda: statistics(sched.target, "gated-priority").queued == n - 1, what="queued in turn")
            calls.append(stub.Classify.future(request("gated-priority", text(4)), timeout=60, metadata=urgent))
            wait_until(lambda: statistics(sched.target, "gated-priority").queued == 3, what="three queued")
            held.gate.open()
            for call in calls:
                call.result()
            lengths = [shape[1] for shape in held.batches()]
        # The urgent (longest) one first, then the other two in the order they came.
        assert lengths[0] == max(lengths) and lengths[1] < lengths[2], lengths
        for bad in ("urgent", "7"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Classify(request("gated-priority", text(2)), metadata=[("pipeserve-priority", bad)], timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority" in refused.value.details()


def test_a_request_whose_deadline_passes_while_queued_never_runs(sched: ServerThread) -> None:
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        with Held(sched.target, "gated-deadline") as held:
            with pytest.raises(grpc.RpcError) as late:
                stub.Classify(request("gated-deadline", text(5), text(6)), timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: statistics(sched.target, "gated-deadline").queued == 0, what="the queue to empty")
        assert held.batches() == []  # nothing ran after the held request
        stats = statistics(sched.target, "gated-deadline")
        assert stats.inference_count == 1 and stats.failure_count == 1
        stub.Classify(request("gated-deadline", text(5)))
        assert statistics(sched.target, "gated-deadline").inference_count == 2


def test_a_cancelled_call_leaves_the_queue_at_once(sched: ServerThread) -> None:
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        with Held(sched.target, "gated-cancel") as held:
            doomed = stub.Classify.future(request("gated-cancel", text(5), text(7), text(9)), timeout=60)
            kept = stub.Classify.future(request("gated-cancel", text(4)), timeout=60)
            wait_until(lambda: statistics(sched.target, "gated-cancel").queued == 4, what="four queued")
            doomed.cancel()
            wait_until(lambda: statistics(sched.target, "gated-cancel").queued == 1, timeout=2,
                       what="the cancelled inputs to leave the queue")
        assert kept.result().results
        assert [shape[0] for shape in held.batches()] == [1]
        stats = statistics(sched.target, "gated-cancel")
        assert stats.inference_count == 2 and stats.failure_count == 1 and stats.in_flight == 0


# -- instance groups ---------------------------------------------------------------------------------


def test_instances_split_the_cores_and_work_goes_to_the_idle_one(sched: ServerThread) -> None:
    served = sched.call(lambda: sched.server.registry.get("gated-instances"))
    instances = served.pool.instances
    assert [inst.device.type for inst in instances] == ["cpu", "cpu"]
    share = cpu_threads_per_instance(2)
    # Each worker thread runs with its share of torch's intra-op threads, or the count asked for.
    assert [inst.executor.submit(torch.get_num_threads).result(10) for inst in instances] == [share, share]
    alone = sched.call(lambda: sched.server.registry.get("one-thread")).pool.instances
    assert [inst.executor.submit(torch.get_num_threads).result(10) for inst in alone] == [1]
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        with Held(sched.target, "gated-instances") as held:
            second = stub.Classify.future(request("gated-instances", text(3)), timeout=60)
            held.gate.wait_for_batches(held.start + 2)  # the idle instance took it: nothing queued
            assert statistics(sched.target, "gated-instances").queued == 0
            third = stub.Classify.future(request("gated-instances", text(4)), timeout=60)
            wait_until(lambda: statistics(sched.target, "gated-instances").queued == 1, what="the third to queue")
        assert second.result().results and third.result().results


def test_a_lone_batch_takes_the_idle_instances_cores_and_its_results_do_not_change(sched: ServerThread) -> None:
    if available_cores() < 2:
        pytest.skip("one core: no idle instance has cores to lend")
    gate = gated_backend.gate("gated-instances")
    share = cpu_threads_per_instance(2)
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        seen = len(gate.threads)
        alone = stub.Classify(request("gated-instances", text(6)), timeout=60)
        # Nothing else ran: the batch took both instances' shares.
        assert gate.threads[seen] == min(available_cores(), 2 * share) > share
        with Held(sched.target, "gated-instances") as held:
            shared = stub.Classify.future(request("gated-instances", text(6)), timeout=60)
            held.gate.wait_for_batches(held.start + 2)
            # The holding batch ran alone (all the cores); this one shares the cores with it.
            assert gate.threads[held.start:held.start + 2] == [2 * share, share]
        shared_result = shared.result()
    assert [[ls.label for ls in r.labels] for r in alone.results] == \
        [[ls.label for ls in r.labels] for r in shared_result.results]
    for lone_scores, shared_scores in zip(scores(alone), scores(shared_result)):
        assert lone_scores == pytest.approx(shared_scores, abs=1e-6)


def test_only_a_split_the_server_chose_lends_cores() -> None:
    assert lone_instance_threads(2, 1, cores=2) == 2
    assert lone_instance_threads(3, 2, cores=4) == 4  # never more than the cores
    assert lone_instance_threads(1, 2, cores=2) == 0  # one instance has every core already
    assert lone_instance_threads(2, 1, requested="1", cores=2) == 0  # the config fixed the count


def test_instance_groups_expand_to_count_times_devices() -> None:
    devices = plan_devices([InstanceGroupSettings(count=3, kind="cpu")])
    assert [str(d) for d in devices] == ["cpu"] * 3
    assert cpu_threads_per_instance(3, cores=8) == 2 and cpu_threads_per_instance(4, cores=2) == 1
    assert cpu_threads_per_instance(1, cores=8, requested="3") == 3
    with pytest.raises(ValueError, match="intra_op_threads"):
        cpu_threads_per_instance(1, requested="0")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="KIND_GPU"):
            plan_devices([InstanceGroupSettings(count=1, kind="gpu", gpus=(0,))])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_instance_group_without_a_gpu_fails_to_load_with_the_reason(sched: ServerThread) -> None:
    with grpc.insecure_channel(sched.target) as channel:
        listed = ms_grpc.ModelServiceStub(channel).ListModels(ms.ListModelsRequest())
    state = next(m for m in listed.models if m.name == "on-gpu")
    assert state.state == ms.MODEL_STATE_FAILED and "KIND_GPU" in state.reason


# -- statistics ------------------------------------------------------------------------------------------


def test_statistics_per_model_version_add_up_and_feed_listeners(sched: ServerThread) -> None:
    events: list[tuple[str, float]] = []
    served = sched.call(lambda: sched.server.registry.get("versions", 2))
    sched.call(lambda: served.stats.listeners.append(lambda event, value: events.append((event, value))))
    with grpc.insecure_channel(sched.target) as channel:
        stub = classify_stub(channel)
        stub.Classify(request("versions", text(3), text(4), version=1))
        for n in (1, 2, 3):
            stub.Classify(request("versions", *[text(2)] * n, version=2))
    one, two = statistics(sched.target, "versions", 1), statistics(sched.target, "versions", 2)
    assert (one.success_count, one.inference_count) == (1, 2)
    assert (two.success_count, two.inference_count, two.execution_count) == (3, 6, 3)
    for s in (one, two):
        assert s.queue.count == s.inference_count and s.compute.count == s.execution_count
        assert sum(s.batch_sizes.values()) == s.execution_count
        assert sum(size * n for size, n in s.batch_sizes.items()) == s.inference_count
        assert s.compute.total_ns > 0 and s.in_flight == 0 and s.queued == 0 and s.failure_count == 0
    names = [e for e, _ in events]
    assert names.count("success_seconds") == 3 and names.count("batch") == 3
    assert names.count("queue_seconds") == 6 and names.count("compute_seconds") == 3
    assert all(value >= 0 for _, value in events)
    with grpc.insecure_channel(sched.target) as channel, pytest.raises(grpc.RpcError) as missing:
        ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest(name="nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# -- the event loop stays free -------------------------------------------------------------------------------


def test_health_answers_within_100ms_while_a_model_is_saturated(tmp_path: Path, tiny_classifier: Path) -> None:
    # The server in its own process (its own GIL); this process only drives it.
    write_model(tmp_path, "busy", tiny_classifier, "max_batch_size: 32 dynamic_batching { max_queue_delay_microseconds: 2000 }")
    server = ServerProcess(tmp_path).start()
    try:
        latencies, most_queued = asyncio.run(_saturate_and_check_health(server.target, seconds=3.0))
    finally:
        server.stop()
    assert most_queued > 32, "the model was not saturated"
    assert len(latencies) >= 20
    assert max(latencies) < 0.100, f"slowest health check {max(latencies) * 1e3:.1f} ms"


async def _saturate_and_check_health(target: str, seconds: float) -> tuple[list[float], int]:
    long_inputs = [text(40 + i) for i in range(8)]
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(target) as channel, \
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as probe:
        stub = classify_stub(channel)
        health = health_pb2_grpc.HealthStub(probe)
        models = ms_grpc.ModelServiceStub(probe)

        async def load() -> None:
            while not stop.is_set():
                await stub.Classify(request("busy", *long_inputs))

        workers = [asyncio.create_task(load()) for _ in range(24)]
        latencies: list[float] = []
        most_queued = 0
        try:
            await health.Check(health_pb2.HealthCheckRequest())
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                started = time.perf_counter()
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                latencies.append(time.perf_counter() - started)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                found = await models.GetModelStatistics(ms.GetModelStatisticsRequest(name="busy"), timeout=5)
                most_queued = max(most_queued, found.models[0].queued)
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    return latencies, most_queued



# -- GPU instances (make test-gpu) -----------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_instances_run_on_their_devices_each_on_its_own_stream(tmp_path: Path, tiny_classifier: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gpus = torch.cuda.device_count()
    write_model(tmp_path, "gpu-pair", tiny_classifier,
                "max_batch_size: 8 dynamic_batching { } instance_group [ { count: 2 kind: KIND_GPU gpus: [ 0 ] } ]")
    write_model(tmp_path, "gpu-all", tiny_classifier, "max_batch_size: 8 dynamic_batching { } instance_group [ { kind: KIND_GPU } ]")
    write_model(tmp_path, "cpu-one", tiny_classifier, "max_batch_size: 8 dynamic_batching { } instance_group [ { kind: KIND_CPU } ]")
    server = ServerThread(server_settings(tmp_path)).start()
    try:
        pair = server.call(lambda: server.server.registry.get("gpu-pair")).pool.instances
        assert [str(inst.device) for inst in pair] == ["cuda:0", "cuda:0"]
        streams = [inst.backend_instance.stream for inst in pair]
        assert all(s is not None and s.cuda_stream != torch.cuda.default_stream(0).cuda_stream for s in streams)
        assert streams[0].cuda_stream != streams[1].cuda_stream
        assert [inst.executor.submit(torch.cuda.current_device).result(10) for inst in pair] == [0, 0]
        every = server.call(lambda: server.server.registry.get("gpu-all")).pool.instances
        assert [str(inst.device) for inst in every] == [f"cuda:{i}" for i in range(gpus)]
        assert [inst.executor.submit(torch.cuda.current_device).result(10) for inst in every] == list(range(gpus))

        texts = [text(n) for n in (2, 9, 17, 33, 5, 12, 40, 1)]
        channels = [client(server.target) for _ in texts]
        calls = [classify_stub(ch).Classify.future(request("gpu-pair", t), timeout=60) for ch, t in zip(channels, texts)]
        on_gpu = [scores(call.result())[0] for call in calls]
        with grpc.insecure_channel(server.target) as channel:
            on_cpu = [scores(classify_stub(channel).Classify(request("cpu-one", t)))[0] for t in texts]
            on_all = scores(classify_stub(channel).Classify(request("gpu-all", *texts)))
        for got, again, want in zip(on_gpu, on_all, on_cpu):
            for label in want:
                assert got[label] == pytest.approx(want[label], abs=1e-3)
                assert again[label] == pytest.approx(want[label], abs=1e-3)
        for ch in channels:
            ch.close()
    finally:
        server.stop()
