"""How long a batch takes, learned from the batches that ran, and the batch worth running next.

A batch of n inputs padded to the longest one costs about

    seconds = a + b*n + c*n*longest

a: the fixed cost of one forward pass (Python, kernel launches), b: the per-input cost, c: the
cost per padded size unit. The batcher uses the model to choose, among queued inputs of similar
size, how many to run together: where `a` dominates (a tiny model, a GPU) it fills the batch;
where `c` dominates (a large model on a CPU) it runs fewer inputs of closer sizes, so that the
padding a batch computes for nothing stays small. Sizes are the tasks' cheap estimates (text
length), never looked into.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

import numpy as np

# Batches remembered for the fit, fits made before trusting one, and batches between refits.
_WINDOW = 128
_MIN_SAMPLES = 8
_REFIT_EVERY = 8


class BatchCostModel:
    """Fits seconds = a + b*n + c*n*longest (a, b, c >= 0) by least squares over recent batches."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=_WINDOW)
        self._unfitted = 0
        # (a, b, c), or None until enough varied batches have run.
        self.coefficients: tuple[float, float, float] | None = None

    def observe(self, n: int, longest: int, seconds: float) -> None:
        self._samples.append((n, n * longest, seconds))
        self._unfitted += 1
        if len(self._samples) >= _MIN_SAMPLES and self._unfitted >= _REFIT_EVERY:
            self._unfitted = 0
            self.coefficients = self._fit() or self.coefficients

    def _fit(self) -> tuple[float, float, float] | None:
        """Non-negative least squares by trying every subset of the three terms (exact for three)."""
        data = np.asarray(self._samples, dtype=np.float64)
        columns = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])
        y = data[:, 2]
        # Scale columns so that the rank test does not depend on the size units.
        scale = np.abs(columns).max(axis=0)
        scale[scale == 0] = 1.0
        columns = columns / scale
        best, best_residual = None, np.inf
        for terms in _SUBSETS:
            x = columns[:, terms]
            if np.linalg.matrix_rank(x, tol=1e-6) < len(terms):
                continue  # the batches seen do not tell these terms apart
            solution, *_ = np.linalg.lstsq(x, y, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(np.square(x @ solution - y).sum())
            if residual < best_residual:
                coefficients = np.zeros(3)
                coefficients[list(terms)] = solution
                best, best_residual = coefficients / scale, residual
        if best is None:
            return None
        return float(best[0]), float(best[1]), float(best[2])

    def choose(self, sizes: Sequence[int], head: int, limit: int, fixed: bool = False) -> tuple[int, int]:
        """The window sizes[start:start+n] to run next, given sizes sorted ascending.

        The window includes `head` (the oldest input, so that none starves) and at most `limit`
        inputs. Without a fit, or when the size is `fixed`, it is the `limit` inputs of least
        padding; with a fit, it is the window whose useful work (what its inputs would cost
        unpadded, without the fixed cost) is the largest share of its cost.
        """
        limit = min(limit, len(sizes))
        prefix = list(itertools.accumulate(sizes, initial=0))
        if fixed or self.coefficients is None:
            start, _ = _least_padding_window(sizes, prefix, head, limit)
            return start, limit
        a, b, c = self.coefficients
        best_start, best_n, best_efficiency = head, 1, -1.0
        for n in range(1, limit + 1):
            start, waste = _least_padding_window(sizes, prefix, head, n)
            total = prefix[start + n] - prefix[start]
            useful = b * n + c * total
            cost = a + b * n + c * (total + waste)
            efficiency = useful / cost if cost > 0 else 1.0
            # Ties go to the larger batch: the same efficiency, fewer passes.
            if efficiency >= best_efficiency * (1 - 1e-9):
                best_start, best_n, best_efficiency = start, n, efficiency
        return best_start, best_n


def _least_padding_window(sizes: Sequence[int], prefix: Sequence[int], head: int, n: int) -> tuple[int, int]:
    """(start, padding) of the n-input window that includes `head` and pads least."""
    best_start, best_waste = head, None
    for start in range(max(0, head - n + 1), min(head, len(sizes) - n) + 1):
        waste = n * sizes[start + n - 1] - (prefix[start + n] - prefix[start])
        if best_waste is None or waste < best_waste:
            best_start, best_waste = start, waste
    return best_start, best_waste or 0


_SUBSETS = [terms for k in (3, 2, 1) for terms in itertools.combinations(range(3), k)]
