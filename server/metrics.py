"""Prometheus metrics on their own HTTP port (8002, as Triton's), per model and version.

Counters and gauges are read from each version's `ModelStats` at scrape time (the numbers the
statistics RPCs report, so the two never disagree); distributions that the stats do not keep
(request, queue and batch compute time, time to first token) are fed by the stats' listeners
into histograms.
Where Triton has a metric for the same thing, its name is used, so Triton dashboards work:

  nv_inference_request_success / _failure{reason}   requests that succeeded / failed
  nv_inference_count, nv_inference_exec_count        inputs run, and batches that ran them
  nv_inference_request_duration_us                   end-to-end time of successful requests
  nv_inference_queue_duration_us                     inputs' time waiting for a batch
  nv_inference_compute_infer_duration_us             batches' time in the model (per batch)
  nv_inference_pending_request_count                 inputs waiting in the queue now
  nv_cpu_memory_*_bytes, nv_gpu_memory_*_bytes       system RAM and GPU memory

Triton exposes its cumulative metrics without the `_total` suffix that prometheus_client adds to
a counter, so those are exposed untyped under Triton's exact names; pipeserve's own counters are
proper counters. A model version's series go when it unloads, as Triton's do.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from pipeserve.server.model_registry import ModelRegistry
from pipeserve.server.served_model import ServedModel

log = logging.getLogger("pipeserve.metrics")

LABELS = ["model", "version"]
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# ModelStats events (see scheduling/stats.py) kept as histograms: event -> (metric name, help).
HISTOGRAMS = {
    "success_seconds": ("pipeserve_request_duration_seconds", "End-to-end time of successful requests"),
    "queue_seconds": ("pipeserve_queue_duration_seconds", "Time an input waited in the queue for a batch"),
    "compute_seconds": ("pipeserve_batch_compute_seconds", "Time one batch spent in the model"),
    "time_to_first_token": ("pipeserve_time_to_first_token_seconds",
                            "Time from a generation request's arrival to its first token"),
}
# How long a scrape waits for the event loop to copy the statistics.
SNAPSHOT_TIMEOUT_S = 5.0


class Buckets:
    """A histogram's bucket counts and sum, kept on the event loop."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        total, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(total)))
        return out


@dataclass
class VersionSnapshot:
    """One model version's numbers, copied on the event loop for one scrape."""

    labels: list[str]
    stats: dict[str, Any]
    batch_sizes: dict[int, int]
    histograms: dict[str, tuple[list[tuple[str, float]], float]] = field(default_factory=dict)


def _untyped(name: str, doc: str) -> Metric:
    return Metric(name, doc, "unknown")


class ModelMetricsCollector:
    """A prometheus_client collector that reads every loaded version's statistics at scrape time."""

    def __init__(self, exporter: MetricsExporter):
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        versions = self.exporter.snapshot()
        yield from self._requests(versions)
        yield from self._generation(versions)
        yield from memory_metrics()

    def _requests(self, versions: list[VersionSnapshot]) -> Iterator[Metric]:
        success = _untyped("nv_inference_request_success", "Successful inference requests (each request counts 1)")
        failure = _untyped("nv_inference_request_failure",
                           "Failed inference requests; reason REJECTED: refused with the queue full")
        count = _untyped("nv_inference_count", "Inferences performed (a batch of n inputs counts n)")
        execs = _untyped("nv_inference_exec_count", "Batch executions (forward passes)")
        request_us = _untyped("nv_inference_request_duration_us",
                              "Cumulative end-to-end time of successful inference requests, microseconds")
        queue_us = _untyped("nv_inference_queue_duration_us",
                            "Cumulative time inputs waited in the scheduling queue, microseconds")
        compute_us = _untyped("nv_inference_compute_infer_duration_us",
                              "Cumulative time batches spent in the model (pre-process, forward, post-process), "
                              "microseconds")
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Inputs waiting in the queue for a batch now", labels=LABELS)
        in_flight = GaugeMetricFamily("pipeserve_inference_in_flight",
                                      "Requests being served now (queued or running)", labels=LABELS)
        batches = HistogramMetricFamily("pipeserve_batch_size", "Inputs per executed batch", labels=LABELS)
        for v in versions:
            s = v.stats
            success.add_sample("nv_inference_request_success", _labels(v.labels), s["success"])
            failure.add_sample("nv_inference_request_failure", _labels(v.labels, reason="REJECTED"), s["rejected"])
            failure.add_sample("nv_inference_request_failure", _labels(v.labels, reason="OTHER"), s["failure"])
            count.add_sample("nv_inference_count", _labels(v.labels), s["inferences"])
            execs.add_sample("nv_inference_exec_count", _labels(v.labels), s["executions"])
            request_us.add_sample("nv_inference_request_duration_us", _labels(v.labels), s["request_ns"] / 1e3)
            queue_us.add_sample("nv_inference_queue_duration_us", _labels(v.labels), s["queue_ns"] / 1e3)
            compute_us.add_sample("nv_inference_compute_infer_duration_us", _labels(v.labels), s["compute_ns"] / 1e3)
            pending.add_metric(v.labels, s["queued"])
            in_flight.add_metric(v.labels, s["in_flight"])
            sizes = Buckets(BATCH_SIZE_BUCKETS)
            for size, n in v.batch_sizes.items():
                sizes.counts[bisect.bisect_left(sizes.bounds, size)] += n
                sizes.sum += size * n
            batches.add_metric(v.labels, sizes.cumulative(), sizes.sum)
        yield from (success, failure, count, execs, request_us, queue_us, compute_us, pending, in_flight, batches)
        for event, (name, doc) in HISTOGRAMS.items():
            histogram = HistogramMetricFamily(name, doc, labels=LABELS)
            for v in versions:
                if event in v.histograms:
                    histogram.add_metric(v.labels, *v.histograms[event])
            yield histogram

    def _generation(self, versions: list[VersionSnapshot]) -> Iterator[Metric]:
        tokens = CounterMetricFamily("pipeserve_generated_tokens", "Tokens generated", labels=LABELS)
        active = GaugeMetricFamily("pipeserve_active_sequences", "Sequences the generation engine decodes now",
                                   labels=LABELS)
        restarts = CounterMetricFamily("pipeserve_instance_restarts", "Dead model instances replaced", labels=LABELS)
        state = GaugeMetricFamily("pipeserve_model_ready", "1 for each model version loaded and ready", labels=LABELS)
        for v in versions:
            tokens.add_metric(v.labels, v.stats["generated_tokens"])
            active.add_metric(v.labels, v.stats["active_sequences"])
            restarts.add_metric(v.labels, v.stats["instance_restarts"])
            state.add_metric(v.labels, 1.0 if v.stats["ready"] else 0.0)
        yield from (tokens, active, restarts, state)


def _labels(labels: list[str], **extra: str) -> dict[str, str]:
    return {**dict(zip(LABELS, labels)), **extra}


def memory_metrics() -> Iterator[Metric]:
    """System and process memory, and CUDA memory where this process uses CUDA."""
    import psutil

    vm = psutil.virtual_memory()
    yield GaugeMetricFamily("nv_cpu_memory_total_bytes", "Total CPU memory (RAM)", value=vm.total)
    yield GaugeMetricFamily("nv_cpu_memory_used_bytes", "Used CPU memory (RAM), system-wide", value=vm.total - vm.available)
    used = GaugeMetricFamily("pipeserve_device_memory_used_bytes",
                             "Memory this process holds per device: resident set on cpu, the CUDA caching "
                             "allocator's reservation on cuda:N", labels=["device"])
    used.add_metric(["cpu"], psutil.Process().memory_info().rss)
    gpu_used = GaugeMetricFamily("nv_gpu_memory_used_bytes", "Used GPU memory (all processes)", labels=["gpu_uuid"])
    gpu_total = GaugeMetricFamily("nv_gpu_memory_total_bytes", "Total GPU memory", labels=["gpu_uuid"])
    for index, uuid, reserved, free, total in cuda_memory():
        used.add_metric([f"cuda:{index}"], reserved)
        gpu_used.add_metric([uuid], total - free)
        gpu_total.add_metric([uuid], total)
    yield from (used, gpu_used, gpu_total)


def cuda_memory() -> list[tuple[int, str, int, int, int]]:
    """(index, uuid, reserved by us, free, total) per GPU; nothing unless this process already
    uses CUDA (a scrape must not create a CUDA context)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", index))
        found.append((index, f"GPU-{uuid}" if not uuid.startswith("GPU-") else uuid, torch.cuda.memory_reserved(index),
                      free, total))
    return found


class MetricsExporter:
    """Serves /metrics over HTTP from a thread; the numbers are copied on the server's event loop."""

    def __init__(self, registry: ModelRegistry, host: str = "0.0.0.0", port: int = 8002):
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(ModelMetricsCollector(self))
        self._http: Any = None
        self._thread: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # (model, version) -> event name -> histogram, fed by ModelStats listeners.
        self._histograms: dict[tuple[str, int], dict[str, Buckets]] = {}
        registry.listeners.append(self._on_model_event)

    @property
    def enabled(self) -> bool:
        return self.requested_port >= 0

    def start(self) -> None:
        """Starts the HTTP listener (port 0 picks a free one); call from the event loop."""
        self._loop = asyncio.get_running_loop()
        for served in self.registry.all_served():
            if (served.name, served.version) not in self._histograms:
                self._on_model_event("loaded", served)
        if not self.enabled:
            return
        try:
            self._http, self._thread = start_http_server(self.requested_port, self.host, registry=self.collectors)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.host}:{self.requested_port} ({exc.strerror or exc}); "
                          "pick another --metrics-port, or -1 to turn metrics off") from exc
        self.port = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    # -- feeding the histograms (on the event loop) ----------------------------------------------

    def _on_model_event(self, event: str, served: ServedModel) -> None:
        key = (served.name, served.version)
        if event == "loaded":
            histograms = self._histograms[key] = {event: Buckets(SECONDS_BUCKETS) for event in HISTOGRAMS}

            def observe(name: str, value: float, histograms: dict[str, Buckets] = histograms) -> None:
                if name in histograms:
                    histograms[name].observe(value)

            served.stats.listeners.append(observe)
        elif event == "unloaded":
            self._histograms.pop(key, None)

    # -- reading (from the HTTP thread) ------------------------------------------------------------

    def snapshot(self) -> list[VersionSnapshot]:
        """Every loaded version's numbers, copied on the event loop so that they are consistent."""
        if self._loop is None or self._loop.is_closed():
            return []
        future = asyncio.run_coroutine_threadsafe(self._copy(), self._loop)
        try:
            return future.result(SNAPSHOT_TIMEOUT_S)
        except Exception:
            future.cancel()
            log.warning("metrics scrape could not read the model statistics in %.0fs", SNAPSHOT_TIMEOUT_S)
            return []

    async def _copy(self) -> list[VersionSnapshot]:
        copies = []
        for served in sorted(self.registry.all_served(), key=lambda m: (m.name, m.version)):
            s = served.stats
            stats = {
                "success": s.success, "failure": s.failure, "rejected": s.rejected, "inferences": s.inferences,
                "executions": s.executions, "request_ns": s.request.total_ns, "queue_ns": s.queue.total_ns,
                "compute_ns": s.compute.total_ns, "queued": s.queued, "in_flight": s.in_flight,
                "generated_tokens": s.generated_tokens, "ready": served.ready(),
                "active_sequences": getattr(s, "active_sequences", 0),
                "instance_restarts": getattr(s, "instance_restarts", 0),
            }
            histograms = {name: (b.cumulative(), b.sum)
                          for name, b in self._histograms.get((served.name, served.version), {}).items() if any(b.counts)}
            copies.append(VersionSnapshot([served.name, str(served.version)], stats, dict(s.batch_sizes), histograms))
        return copies
