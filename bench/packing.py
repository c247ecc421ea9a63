"""Packing a batch's texts side by side, measured before it is built into the server.

Padding is the waste a CPU batch pays for mixed lengths. Packing removes it: the texts of a batch
are laid end to end in rows of a fixed capacity, and a block-diagonal attention mask keeps each
text attending to itself only. Here it is done at the encoder's boundary, with hooks, so that the
embeddings (each text's own positions) and the task's head run on the usual padded batch and only
the transformer layers, nearly all the compute, see the packed rows.

For distilbert-base (random weights, the 192 texts of 8 to 40 words of bench/classification.py),
all forwards under inference_mode on every core, best of two passes over the texts:
  sorted bN       the texts sorted by length, batches of N (little padding: the bound the
                  server's length grouping reaches, bench/classification.py)
  packed bN xK    batches of N texts in arrival order, packed first-fit-decreasing into rows of
                  K times the batch's longest text
Prints texts/s, the ratio to the best sorted batching, and the largest difference of any logit
from the unpacked forward's.

    python -m bench packing
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench.harness import load_average, table

MODEL = "distilbert-base"
TEXTS = 192
SORTED = (8, 16, 32)
PACKED = ((16, 1), (32, 1), (64, 1), (32, 2), (64, 2), (64, 4))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of text indices whose lengths add up to at most `capacity`, longest texts placed first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class PackedEncoder:
    """While active, the encoder module runs on packed rows: a pre-hook packs its padded input
    (and replaces the mask with a block-diagonal one), a hook unpacks its output."""

    def __init__(self, encoder: Any):
        self.encoder = encoder
        self.lengths: list[int] = []
        self.rows: list[list[int]] = []
        self.capacity = 0

    def layout(self, lengths: list[int], capacity: int) -> None:
        self.lengths, self.capacity = lengths, capacity
        self.rows = first_fit_decreasing(lengths, capacity)

    def __enter__(self) -> PackedEncoder:
        self._hooks = [self.encoder.register_forward_pre_hook(self._pack, with_kwargs=True),
                       self.encoder.register_forward_hook(self._unpack, with_kwargs=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def _pack(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        import torch

        hidden = args[0] if args else kwargs.pop("hidden_states")
        packed = hidden.new_zeros(len(self.rows), self.capacity, hidden.shape[-1])
        # Additive (0 keeps, the dtype's minimum drops): what both eager and SDPA attention take.
        mask = torch.full((len(self.rows), 1, self.capacity, self.capacity), torch.finfo(hidden.dtype).min,
                          dtype=hidden.dtype)
        for r, row in enumerate(self.rows):
            at = 0
            for i in row:
                n = self.lengths[i]
                packed[r, at:at + n] = hidden[i, :n]
                mask[r, 0, at:at + n, at:at + n] = 0
                at += n
        kwargs.pop("attention_mask", None)
        if len(args) > 1:  # (hidden_states, attention_mask, ...) given by position
            return (packed, mask, *args[2:]), kwargs
        return (packed,), {**kwargs, "attention_mask": mask}

    def _unpack(self, _module: Any, _args: tuple, _kwargs: dict, output: Any) -> Any:
        packed = output[0]
        hidden = packed.new_zeros(len(self.lengths), max(self.lengths), packed.shape[-1])
        for r, row in enumerate(self.rows):
            at = 0
            for i in row:
                n = self.lengths[i]
                hidden[i, :n] = packed[r, at:at + n]
                at += n
        output.last_hidden_state = hidden
        return output


def best_rate(run: Callable[[], dict[int, Any]], texts: int) -> tuple[float, dict[int, Any]]:
    best, out = float("inf"), {}
    for _ in range(2):
        started = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - started)
    return texts / best, out


def main() -> None:
    import torch
    import transformers

    from bench.classification import MODELS_DIR, build_models, make_texts

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_models()
    folder = MODELS_DIR / MODEL
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    ids = [tokenizer(text)["input_ids"] for text in make_texts(tokenizer, TEXTS)]
    base = model.base_model
    packing = PackedEncoder(base.transformer if hasattr(base, "transformer") else base.encoder)

    def forward(order: list[int]) -> Any:
        batch = tokenizer.pad({"input_ids": [ids[i] for i in order]}, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits

    def sorted_batches(size: int) -> dict[int, Any]:
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = {}
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            out.update(zip(chunk, forward(chunk)))
        return out

    def packed_batches(size: int, times: int) -> dict[int, Any]:
        out = {}
        with packing:
            for start in range(0, len(ids), size):
                chunk = list(range(start, min(start + size, len(ids))))
                lengths = [len(ids[i]) for i in chunk]
                packing.layout(lengths, max(lengths) * times)
                out.update(zip(chunk, forward(chunk)))
        return out

    lengths = sorted(len(x) for x in ids)
    print(f"packing benchmark: {MODEL}, {len(ids)} texts of {lengths[0]} to {lengths[-1]} tokens "
          f"(median {lengths[len(lengths) // 2]}), {torch.get_num_threads()} threads, load average {load_average()}",
          flush=True)
    sorted_rates = {size: best_rate(lambda size=size: sorted_batches(size), len(ids)) for size in SORTED}
    bound_size = max(sorted_rates, key=lambda size: sorted_rates[size][0])
    bound, reference = sorted_rates[bound_size]
    rows = [(f"sorted b{size}", f"{rate:.1f}", f"{rate / bound:.2f}x", "-") for size, (rate, _) in sorted_rates.items()]
    for size, times in PACKED:
        rate, out = best_rate(lambda size=size, times=times: packed_batches(size, times), len(ids))
        diff = max(float((out[i] - reference[i]).abs().max()) for i in reference)
        rows.append((f"packed b{size} x{times}", f"{rate:.1f}", f"{rate / bound:.2f}x", f"{diff:.1e}"))
    print(table(rows, ("forward", "texts/s", f"vs sorted b{bound_size}", "max |logit diff|")))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
