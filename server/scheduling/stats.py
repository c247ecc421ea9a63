"""Counters and timings per model version, kept on the event loop and read by RPCs and metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    total_ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.total_ns += int(seconds * 1e9) * n


@dataclass
class ModelStats:
    """What happened to one model version since it was loaded."""

    success: int = 0
    failure: int = 0
    rejected: int = 0
    # Inputs run, and batches (forward passes) that ran them.
    inferences: int = 0
    executions: int = 0
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)
    batch_sizes: Counter = field(default_factory=Counter)
    in_flight: int = 0
    queued: int = 0
    generated_tokens: int = 0
    time_to_first_token: Duration = field(default_factory=Duration)
    # Observers (the Prometheus exporter) called as observe(event, value) on the event loop.
    listeners: list = field(default_factory=list)

    def notify(self, event: str, value: float) -> None:
        for listener in self.listeners:
            listener(event, value)
