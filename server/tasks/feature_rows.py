"""Forward passes for tasks whose inputs expand into several feature rows.

Question answering splits a long context into windows and zero-shot classification pairs each
input with every candidate label, so a batch of N inputs becomes many more rows. The backend
still sees at most `rows_per_call` rows at a time (the model's max_batch_size), which keeps
memory bounded and respects backends with a fixed largest batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipeserve.backends.base import Instance


def run_in_chunks(instance: Instance, tensors: Mapping[str, torch.Tensor], rows_per_call: int) -> dict[str, torch.Tensor]:
    """Runs `tensors` (all with the same first dimension) through `instance`, `rows_per_call`
    rows at a time, and concatenates the outputs in row order."""
    total = next(iter(tensors.values())).shape[0]
    step = max(1, rows_per_call)
    if total <= step:
        return instance.run(dict(tensors))
    parts = [instance.run({name: t[begin : begin + step] for name, t in tensors.items()})
             for begin in range(0, total, step)]
    return {name: torch.cat([p[name] for p in parts], dim=0) for name in parts[0]}
