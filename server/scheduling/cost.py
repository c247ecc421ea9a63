"""How long a batch takes, learned from the batches that ran, and the batch worth running next.

A batch of n inputs padded to the longest one (size L) costs about

    seconds = a + c * n * L

a: the fixed cost of one forward pass (Python overhead, kernel launches, streaming the weights
through memory once), c: the cost of one padded size unit. The batcher uses the fit to choose,
among queued inputs, how many of similar size to run together: where `a` dominates (a tiny model,
a GPU) it fills the batch; where `c` dominates (a large model on a CPU) it runs fewer inputs of
closer size, so that the padding a batch computes for nothing stays small. Sizes are the tasks'
cheap estimates (text length), never looked into.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

# Batches remembered for the fit, batches before a first fit, and batches between refits.
_WINDOW = 128
_MIN_SAMPLES = 8
_REFIT_EVERY = 8
# The padded sizes seen must vary by this much (coefficient of variation) to tell a from c.
_MIN_SPREAD = 0.1


class BatchCostModel:
    """Fits seconds = a + c * n * longest (a, c >= 0) by least squares over recent batches."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=_WINDOW)
        self._unfitted = 0
        # (a, c), or None until enough varied batches have run.
        self.coefficients: tuple[float, float] | None = None

    def observe(self, n: int, longest: int, seconds: float) -> None:
        self._samples.append((float(n * longest), seconds))
        self._unfitted += 1
        if len(self._samples) >= _MIN_SAMPLES and self._unfitted >= _REFIT_EVERY:
            self._unfitted = 0
            self.coefficients = self._fit() or self.coefficients

    def _fit(self) -> tuple[float, float] | None:
        count = len(self._samples)
        mean_x = sum(x for x, _ in self._samples) / count
        mean_y = sum(y for _, y in self._samples) / count
        var_x = sum((x - mean_x) ** 2 for x, _ in self._samples) / count
        if mean_x <= 0 or var_x < (_MIN_SPREAD * mean_x) ** 2:
            return None  # the batches seen do not tell the fixed cost from the padded one
        c = sum((x - mean_x) * (y - mean_y) for x, y in self._samples) / count / var_x
        if c <= 0:
            return max(mean_y, 0.0), 0.0  # padding costs nothing measurable: fill the batches
        a = mean_y - c * mean_x
        if a < 0:  # no fixed cost measurable: the line through the origin
            return 0.0, sum(x * y for x, y in self._samples) / sum(x * x for x, _ in self._samples)
        return a, c

    def choose(self, sizes: Sequence[int], head: int, limit: int, fixed: bool = False) -> tuple[int, int]:
        """The window sizes[start:start+n] to run next, given sizes sorted ascending.

        The window includes `head` (the oldest input, so that none starves) and at most `limit`
        inputs. Without a fit, or when the size is `fixed`, it is the `limit` inputs of least
        padding; with a fit, it is the window whose avoidable cost per input (its share of the
        fixed cost, plus the padding it computes for nothing) is least. An input's own unpadded
        cost is the same in any batch, so it does not enter the choice.
        """
        limit = min(limit, len(sizes))
        prefix = list(itertools.accumulate(sizes, initial=0))
        if fixed or self.coefficients is None or self.coefficients[1] == 0:
            return _least_padding_window(sizes, prefix, head, limit), limit
        a, c = self.coefficients
        fixed_units = a / c  # the fixed cost in padded size units
        best_start, best_n, best_overhead = head, 1, float("inf")
        for n in range(1, limit + 1):
            for start in range(max(0, head - n + 1), min(head, len(sizes) - n) + 1):
                padding = n * sizes[start + n - 1] - (prefix[start + n] - prefix[start])
                overhead = (fixed_units + padding) / n
                # Ties go to the larger batch: the same overhead, fewer passes.
                if overhead <= best_overhead * (1 + 1e-9):
                    best_start, best_n, best_overhead = start, n, overhead
        return best_start, best_n


def _least_padding_window(sizes: Sequence[int], prefix: Sequence[int], head: int, n: int) -> int:
    """The start of the n-input window that includes `head` and pads least."""
    best_start, best_waste = head, None
    for start in range(max(0, head - n + 1), min(head, len(sizes) - n) + 1):
        waste = n * sizes[start + n - 1] - (prefix[start + n] - prefix[start])
        if best_waste is None or waste < best_waste:
            best_start, best_waste = start, waste
    return best_start
