"""Step-wise decoding of transformers causal LMs for the eager backend: the running batch's cache.

`RowCache` is a transformers `Cache` whose rows are independent sequences of different lengths.
Each layer keeps its keys and values in buffers [rows, heads, capacity, head_dim] with room to
grow; row r holds its tokens at columns [0, length_r), so a decode step writes each row's new
key at its own column (no shifting, no concatenation: `DynamicCache` copies the whole cache on
every step) and attends over [0, max length] with a mask that hides each row's unused columns.
Rows leave by moving the last row into the hole (one row copied, not the batch); rows join by
copying their prompt's keys and values in.

A prompt is prefilled on its own, unpadded, exactly as `model.generate` runs it, so the first
token is the one `generate` picks; decode steps then differ from `generate`'s only by the
padding columns a mask hides.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from pipeserve.backends.base import DecoderState
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

# Capacity grows in steps of this many positions, so that buffers are not reallocated every step.
_LENGTH_QUANTUM = 64
_MASKED_ATTENTION = ("sdpa", "eager")


class _RowLayer(CacheLayerMixin):
    """One attention layer's keys and values for every row of a RowCache."""

    is_sliding = False

    def __init__(self, owner: RowCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RowCache layer is filled from a prefill, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Writes one new position per row (at each row's length); returns the keys and values of
        columns [0, width) of the active rows, which the step's mask covers."""
        owner = self.owner
        n = owner.rows
        if key_states.shape[-2] != 1:
            raise RuntimeError("RowCache takes one new token per row per step")
        rows, at = owner.row_index[:n], owner.lengths[:n]
        self.keys[rows, :, at] = key_states[:, :, 0]
        self.values[rows, :, at] = value_states[:, :, 0]
        return self.keys[:n, :, : owner.width], self.values[:n, :, : owner.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache, DecoderState):
    """The running batch's keys and values; see the module docstring."""

    def __init__(self, num_layers: int):
        self._rows = 0
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.row_index = torch.zeros(0, dtype=torch.long)
        # Columns the current step attends over: the longest row plus its new token.
        self.width = 0
        super().__init__(layers=[_RowLayer(self) for _ in range(num_layers)])

    # -- DecoderState --------------------------------------------------------------------------

    @property
    def rows(self) -> int:
        return self._rows

    @classmethod
    def from_prefills(cls, caches: Sequence[DynamicCache]) -> RowCache:
        """One row per prefilled (batch of one, unpadded) DynamicCache, in order."""
        first = caches[0]
        if not all(isinstance(layer, DynamicLayer) and type(layer) is DynamicLayer for layer in first.layers):
            kinds = sorted({type(layer).__name__ for layer in first.layers})
            raise NotImplementedError(f"step-wise decoding supports full-attention layers only, not {kinds}")
        state = cls(len(first.layers))
        lengths = [c.layers[0].keys.shape[-2] for c in caches]
        state._allocate(len(caches), max(lengths) + 1, first.layers[0].keys, first.layers[0].values)
        for row, cache in enumerate(caches):
            for layer, source in zip(state.layers, cache.layers):
                n = source.keys.shape[-2]
                layer.keys[row, :, :n] = source.keys[0]
                layer.values[row, :, :n] = source.values[0]
        state.lengths[: len(caches)] = torch.tensor(lengths)
        state._rows = len(caches)
        return state

    @torch.inference_mode()  # the buffers are inference tensors: writes to them must be, too
    def extend(self, other: DecoderState) -> None:
        assert isinstance(other, RowCache)
        if other.rows == 0:
            return
        if self._rows == 0:
            self._adopt(other)
            return
        n, m = self._rows, other.rows
        used = int(other.lengths[:m].max())
        self._reserve(n + m, used + 1)
        for layer, source in zip(self.layers, other.layers):
            layer.keys[n : n + m, :, :used] = source.keys[:m, :, :used]
            layer.values[n : n + m, :, :used] = source.values[:m, :, :used]
        self.lengths[n : n + m] = other.lengths[:m]
        self._rows = n + m
        other._clear()

    @torch.inference_mode()
    def release(self, rows: Sequence[int]) -> list[int]:
        order = list(range(self._rows))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                # Rows above `row` that were to go are gone already, so `last` is a row we keep.
                used = int(self.lengths[last])
                for layer in self.layers:
                    layer.keys[row, :, :used] = layer.keys[last, :, :used]
                    layer.values[row, :, :used] = layer.values[last, :, :used]
                self.lengths[row] = self.lengths[last]
                order[row] = order[last]
            order.pop()
        self._rows = len(order)
        if self._rows == 0:
            self._clear()  # an idle instance holds no cache memory
        return order

    # -- one step ------------------------------------------------------------------------------

    def begin_step(self) -> torch.Tensor:
        """Makes room for one more token per row; returns the step's mask of valid columns [rows, width]."""
        n = self._rows
        lengths = self.lengths[:n]
        self.width = int(lengths.max()) + 1
        self._reserve(n, self.width)
        return torch.arange(self.width)[None, :] <= lengths[:, None]

    def end_step(self) -> None:
        self.lengths[: self._rows] += 1

    # -- buffers -------------------------------------------------------------------------------

    def _allocate(self, rows: int, length: int, like_keys: torch.Tensor, like_values: torch.Tensor) -> None:
        length = -(-length // _LENGTH_QUANTUM) * _LENGTH_QUANTUM
        for layer in self.layers:
            # Zeros, not empty: masked columns still enter the attention product (weight 0), and
            # 0 * NaN from uninitialised memory would poison the row.
            layer.keys = like_keys.new_zeros((rows, like_keys.shape[1], length, like_keys.shape[3]))
            layer.values = like_values.new_zeros((rows, like_values.shape[1], length, like_values.shape[3]))
            layer.is_initialized = True
        self.lengths = torch.zeros(rows, dtype=torch.long)
        self.row_index = torch.arange(rows)

    def _reserve(self, rows: int, length: int) -> None:
        """Grows the buffers (copying what they hold) to at least `rows` x `length`."""
        keys = self.layers[0].keys
        have_rows, have_len = keys.shape[0], keys.shape[2]
        if rows <= have_rows and length <= have_len:
            return
        new_rows = have_rows if rows <= have_rows else max(rows, 2 * have_rows)
        new_len = have_len if length <= have_len else max(length, have_len + have_len // 2)
        new_len = -(-new_len // _LENGTH_QUANTUM) * _LENGTH_QUANTUM
        n, used = self._rows, int(self.lengths[: self._rows].max()) if self._rows else 0
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros((new_rows, old.shape[1], new_len, old.shape[3]))
                new[:n, :, :used] = old[:n, :, :used]
                setattr(layer, name, new)
        lengths = torch.zeros(new_rows, dtype=torch.long)
        lengths[:n] = self.lengths[:n]
        self.lengths = lengths
        self.row_index = torch.arange(new_rows)

    def _adopt(self, other: RowCache) -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys, mine.values, mine.is_initialized = theirs.keys, theirs.values, True
        self.lengths, self.row_index, self._rows = other.lengths, other.row_index, other._rows
        other._clear()

    def _clear(self) -> None:
        for layer in self.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
        self._rows = 0
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.row_index = torch.zeros(0, dtype=torch.long)


class CausalLMStepper:
    """Runs prefill and decode steps of one causal LM with RowCache states."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        config = model.config.get_text_config(decoder=True)
        if getattr(model.config, "is_encoder_decoder", False):
            raise NotImplementedError("step-wise decoding is for decoder-only models")
        layer_types = getattr(config, "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise NotImplementedError("step-wise decoding supports full-attention models only; "
                                      f"this one has layers {sorted(set(layer_types))}")
        self._attention()
        parameters = inspect.signature(model.forward).parameters
        # transformers renamed past_key_values to cache in 5.x; take whichever this version has.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in parameters

    def _attention(self) -> str:
        implementation = self.model.config._attn_implementation
        if implementation not in _MASKED_ATTENTION:
            raise NotImplementedError(
                f"step-wise decoding needs attention that takes a padding mask ({', '.join(_MASKED_ATTENTION)}); "
                f"this model uses {implementation!r}")
        return implementation

    def _forward(self, **inputs: Any) -> torch.Tensor:
        if self.logits_to_keep:
            inputs["logits_to_keep"] = 1
        outputs = self.model(**inputs, use_cache=True, return_dict=True)
        return outputs.logits[:, -1].to(dtype=torch.float32, device="cpu", copy=True)

    def prefill(self, prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, RowCache]:
        self._attention()
        logits, caches = [], []
        for prompt in prompts:
            # One prompt at a time, unpadded: the same computation as `generate` for that prompt.
            input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            cache = DynamicCache(config=self.model.config)
            logits.append(self._forward(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        **{self.cache_argument: cache}))
            caches.append(cache)
        return torch.cat(logits), RowCache.from_prefills(caches)

    def decode(self, state: RowCache, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        n = state.rows
        valid = state.begin_step()
        if self._attention() == "sdpa":
            mask = valid[:, None, None, :]  # True: attend
        else:
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, torch.finfo(dtype).min)[:, None, None, :]
        position_ids = state.lengths[:n, None].clone()
        logits = self._forward(
            input_ids=tokens.view(n, 1).to(device), attention_mask=mask.to(device),
            position_ids=position_ids.to(device), **{self.cache_argument: state},
        )
        state.end_step()
        return logits
