"""Prometheus metrics on their own port, scraped while requests are queued, after they finish,
and after a model unloads."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import server_settings
from tests.model_folders import add_model
from tests.server_harness import ServerThread


def text(items: list[str]) -> list[triton.InferInput]:
    tensor = triton.InferInput("TEXT", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object))
    return [tensor]


@pytest.fixture(scope="module")
def metrics_server(model_repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics-repo")
    # Requests wait for company until four are queued (or 5 s pass): a scrape sees them pending.
    add_model(repo, "held", extra="max_batch_size: 8\n"
              "dynamic_batching { max_queue_delay_microseconds: 5000000 preferred_batch_size: [4] }")
    add_model(repo, "strict", extra="max_sequence_length: 8\ntruncation: TRUNCATION_REJECT")
    add_model(repo, "gpt2", source="gpt2", task="text-generation")
    server = ServerThread(server_settings(repo, metrics_port=0, metrics_host="127.0.0.1")).start()
    yield server
    server.stop()


class Scrape:
    """One scrape of /metrics, as {(sample name, sorted labels): value} plus each family's type."""

    def __init__(self, port: int):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            self.text = response.read().decode()
        self.samples: dict[tuple[str, tuple], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def models(self) -> set[str]:
        return {dict(labels).get("model") for name, labels in self.samples if name == "nv_inference_request_success"}


def test_metrics_scraped_during_and_after_load(metrics_server):
    server = metrics_server
    port = server.server.metrics.port
    held = server.server.registry.served["held"][1]
    model = {"model": "held", "version": "1"}

    async def scenario():
        async with triton_aio.InferenceServerClient(server.target) as client:
            calls = [asyncio.ensure_future(client.infer("held", text([f"queued {i}"]))) for i in range(3)]
            deadline = time.monotonic() + 30
            while server.call(lambda: held.stats.queued) < 3:
                assert time.monotonic() < deadline, "requests never queued"
                await asyncio.sleep(0.02)
            during = await asyncio.to_thread(Scrape, port)
            calls.append(asyncio.ensure_future(client.infer("held", text(["the fourth fills the batch"]))))
            await asyncio.gather(*calls)
            return during

    during = asyncio.run(scenario())
    assert during.value("nv_inference_pending_request_count", **model) == 3
    assert during.value("pipeserve_inference_in_flight", **model) == 3
    assert during.value("nv_inference_request_success", **model) == 0

    after = Scrape(port)
    assert after.value("nv_inference_request_success", **model) == 4
    assert after.value("nv_inference_count", **model) == 4
    assert after.value("nv_inference_exec_count", **model) == 1
    assert after.value("nv_inference_pending_request_count", **model) == 0
    assert after.value("pipeserve_inference_in_flight", **model) == 0
    for name in ("nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                 "nv_inference_compute_infer_duration_us"):
        assert after.value(name, **model) > 0, name
    # The batch of four, as a histogram; and the batch's compute time, fed by the stats listeners.
    assert after.value("pipeserve_batch_size_bucket", le="2.0", **model) == 0
    assert after.value("pipeserve_batch_size_bucket", le="4.0", **model) == 1
    assert after.value("pipeserve_batch_size_sum", **model) == 4
    assert after.value("pipeserve_batch_compute_seconds_count", **model) == 1
    assert after.value("pipeserve_request_duration_seconds_count", **model) == 4
    assert after.value("pipeserve_queue_duration_seconds_count", **model) == 4
    assert after.value("pipeserve_model_ready", **model) == 1
    assert after.value("pipeserve_generated_tokens_total", **model) == 0
    # Triton's names, exactly (no _total suffix), so Triton dashboards work.
    assert "nv_inference_request_success{" in after.text and "nv_inference_request_success_total" not in after.text


def test_failures_and_memory(metrics_server):
    server = metrics_server
    with triton.InferenceServerClient(server.target) as client:
        client.infer("strict", text(["short"]))
        with pytest.raises(InferenceServerException):
            client.infer("strict", text(["a sentence much longer than the eight tokens this model accepts"]))
    scrape = Scrape(server.server.metrics.port)
    model = {"model": "strict", "version": "1"}
    assert scrape.value("nv_inference_request_success", **model) == 1
    assert scrape.value("nv_inference_request_failure", reason="OTHER", **model) == 1
    assert scrape.value("nv_inference_request_failure", reason="REJECTED", **model) == 0
    assert scrape.value("nv_cpu_memory_total_bytes") > scrape.value("nv_cpu_memory_used_bytes") > 0
    assert scrape.value("pipeserve_device_memory_used_bytes", device="cpu") > 50 * 2**20  # torch alone is more


def test_generated_tokens_and_time_to_first_token(metrics_server):
    server = metrics_server
    with triton.InferenceServerClient(server.target) as client:
        for prompt in ("Hello", "Once upon a time"):
            client.infer("gpt2", text([prompt]), parameters={"max_new_tokens": 5, "do_sample": False})
    scrape = Scrape(server.server.metrics.port)
    model = {"model": "gpt2", "version": "1"}
    assert scrape.value("pipeserve_generated_tokens_total", **model) == 10
    assert scrape.value("pipeserve_time_to_first_token_seconds_count", **model) == 2
    assert scrape.value("pipeserve_time_to_first_token_seconds_bucket", le="+Inf", **model) == 2
    assert scrape.value("pipeserve_time_to_first_token_seconds_sum", **model) > 0
    assert scrape.types["pipeserve_time_to_first_token_seconds"] == "histogram"
    assert scrape.value("nv_inference_request_success", **model) == 2


def test_unloaded_model_leaves_the_metrics(metrics_server):
    server = metrics_server
    with triton.InferenceServerClient(server.target) as client:
        assert "strict" in Scrape(server.server.metrics.port).models()
        client.unload_model("strict")
        assert Scrape(server.server.metrics.port).models() == {"held", "gpt2"}
        client.load_model("strict")
        assert Scrape(server.server.metrics.port).value("nv_inference_request_success", model="strict", version="1") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)")
def test_cuda_memory_is_reported(model_repository, tmp_path):
    add_model(tmp_path, "on-gpu", extra="instance_group [ { kind: KIND_GPU count: 1 gpus: [0] } ]")
    server = ServerThread(server_settings(tmp_path, metrics_port=0, metrics_host="127.0.0.1")).start()
    try:
        with triton.InferenceServerClient(server.target) as client:
            client.infer("on-gpu", text(["on the GPU"]))
        scrape = Scrape(server.server.metrics.port)
        assert scrape.value("pipeserve_device_memory_used_bytes", device="cuda:0") > 0
        totals = [v for (name, _), v in scrape.samples.items() if name == "nv_gpu_memory_total_bytes"]
        used = [v for (name, _), v in scrape.samples.items() if name == "nv_gpu_memory_used_bytes"]
        assert totals and used and 0 < used[0] <= totals[0]
    finally:
        server.stop()
