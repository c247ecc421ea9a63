"""One way to count a request in a model's statistics, whichever runtime serves it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from pipeserve.server.scheduling.stats import ModelStats


@contextlib.contextmanager
def counted(stats: ModelStats) -> Iterator[None]:
    """Counts the request in flight while the block runs, then as a success (timed end to end)
    or a failure, whatever ended it (an error, its deadline, a cancellation)."""
    stats.in_flight += 1
    started = time.monotonic()
    try:
        yield
    except BaseException:
        stats.failure += 1
        if stats.listeners:
            stats.notify("failure_seconds", time.monotonic() - started)
        raise
    else:
        elapsed = time.monotonic() - started
        stats.success += 1
        stats.request.add(elapsed)
        if stats.listeners:
            stats.notify("success_seconds", elapsed)
    finally:
        stats.in_flight -= 1
