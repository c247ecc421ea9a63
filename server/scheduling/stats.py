"""Counters and timings per model version, kept on the event loop and read by RPCs and metrics.

A metrics exporter reads the counters when it is scraped and registers a listener for what it
wants as distributions; a listener is called on the event loop as listener(event, value) with:

    "success_seconds"  a request answered; value: its time from submission to answer
    "failure_seconds"  an admitted request failed (deadline, cancelled, model error); value: ditto
    "queue_seconds"    an input left the queue for a batch; value: the time it waited
    "compute_seconds"  a batch ran (tokenization, forward, decoding); value: its duration
    "batch"            a batch ran; value: its number of inputs
    "time_to_first_token"  (generation engine) a sequence's first token; value: seconds since arrival
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

EVENTS = ("success_seconds", "failure_seconds", "queue_seconds", "compute_seconds", "batch", "time_to_first_token")


@dataclass
class Duration:
    count: int = 0
    total_ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.total_ns += int(seconds * 1e9) * n


@dataclass
class ModelStats:
    """What happened to one model version since it was loaded.

    Requests: `success` answered (`request` times them end to end); `failure` were admitted and
    not answered (a model error, past their deadline, cancelled); `rejected` were refused at once,
    the queue being full. Inputs: `inferences` ran in `executions` batches (forward passes),
    `batch_sizes` counts batches by size; `queue` times each input's wait, `compute` each batch.
    `in_flight` requests and `queued` inputs are now. `instance_restarts` counts dead instances
    replaced; the generation engine keeps `active_sequences`, `generated_tokens` and
    `time_to_first_token`.
    """

    success: int = 0
    failure: int = 0
    rejected: int = 0
    request: Duration = field(default_factory=Duration)
    inferences: int = 0
    executions: int = 0
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batch_sizes: Counter = field(default_factory=Counter)
    in_flight: int = 0
    queued: int = 0
    instance_restarts: int = 0
    active_sequences: int = 0
    generated_tokens: int = 0
    time_to_first_token: Duration = field(default_factory=Duration)
    # Observers (a metrics exporter) called as listener(event, value) on the event loop; see EVENTS.
    listeners: list[Callable[[str, float], None]] = field(default_factory=list)

    def notify(self, event: str, value: float) -> None:
        for listener in self.listeners:
            listener(event, value)
