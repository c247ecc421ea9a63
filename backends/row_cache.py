"""The running batch's keys and values for the eager backend's step-wise decoding.

`RowCache` is a transformers `Cache` whose rows are independent sequences of different lengths.
Each layer keeps its keys and values in buffers [rows, heads, capacity, head_dim] with room to
grow; row r holds its tokens at columns [0, length_r), so a decode step writes each row's new
key at its own column (no shifting, no concatenation: `DynamicCache` copies the whole cache on
every step) and attends over [0, max length] with a mask that hides each row's unused columns.
Rows leave by moving the last row into the hole (one row copied, not the batch); rows join by
copying their prompt's keys and values in, or, in a joint step, by the forward writing them into
new rows (`JointLayout`, attention.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pipeserve.backends.attention import JointLayout, additive_mask
from pipeserve.backends.base import DecoderState
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

# Capacity grows in steps of this many positions, so that buffers are not reallocated every step.
_LENGTH_QUANTUM = 64


class _RowLayer(CacheLayerMixin):
    """One attention layer's keys and values for every row of a RowCache."""

    is_sliding = False

    def __init__(self, owner: RowCache):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The first joint step of an empty state: buffers as large as the owner has reserved."""
        rows, length = self.owner.capacity
        self.keys = key_states.new_zeros((rows, key_states.shape[1], length, key_states.shape[3]))
        self.values = value_states.new_zeros((rows, value_states.shape[1], length, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Writes one new position per row (at each row's length); returns the keys and values of
        columns [0, width) of the active rows, which the step's mask covers."""
        owner = self.owner
        joint = owner.joint
        if joint is not None:
            return self._update_joint(joint, key_states, value_states)
        n = owner.rows
        if key_states.shape[-2] != 1:
            raise RuntimeError("RowCache takes one new token per row per step")
        rows, at = owner.row_index[:n], owner.lengths[:n]
        self.keys[rows, :, at] = key_states[:, :, 0]
        self.values[rows, :, at] = value_states[:, :, 0]
        return self.keys[:n, :, : owner.width], self.values[:n, :, : owner.width]

    def _update_joint(self, joint: JointLayout, key_states: torch.Tensor, value_states: torch.Tensor):
        """key/value_states [1, kv_heads, tokens, head_dim] laid out as `joint` says: the running rows'
        tokens go to their rows at their lengths, each prompt's to its new row from column 0."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner, n = self.owner, joint.running
        if n:
            rows, at = owner.row_index[:n], owner.lengths[:n]
            self.keys[rows, :, at] = key_states[0, :, :n].transpose(0, 1)
            self.values[rows, :, at] = value_states[0, :, :n].transpose(0, 1)
        for row, (offset, length) in enumerate(joint.prompts, start=n):
            self.keys[row, :, :length] = key_states[0, :, offset : offset + length]
            self.values[row, :, :length] = value_states[0, :, offset : offset + length]
        return self.keys[: n + len(joint.prompts)], self.values[: n + len(joint.prompts)]

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
        # The joint step in progress, if any, and the (rows, length) that empty layers allocate.
        self.joint: JointLayout | None = None
        self.capacity = (0, 0)
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
        valid = self._valid_columns()
        self._reserve(self._rows, self.width)
        return valid

    def _valid_columns(self) -> torch.Tensor:
        """[rows, width]: True where a row holds a key and at its next column; sets `width` (the longest
        row plus its new token)."""
        lengths = self.lengths[: self._rows]
        self.width = int(lengths.max()) + 1
        return torch.arange(self.width)[None, :] <= lengths[:, None]

    def end_step(self) -> None:
        self.lengths[: self._rows] += 1

    def begin_joint_step(self, prompt_lengths: Sequence[int], mask_dtype: torch.dtype) -> JointLayout:
        """Makes room for one more token per row and a row per prompt; returns the step's layout."""
        n, p = self._rows, len(prompt_lengths)
        mask, self.width = None, 0
        if n:
            mask = additive_mask(self._valid_columns(), mask_dtype)
        self._reserve(n + p, max([self.width, *prompt_lengths]))
        offsets, at = [], n
        for length in prompt_lengths:
            offsets.append((at, length))
            at += length
        self.joint = JointLayout(n, mask, self.width, offsets)
        return self.joint

    def end_joint_step(self) -> None:
        joint, self.joint = self.joint, None
        assert joint is not None
        n = joint.running
        self.lengths[:n] += 1
        for row, (_, length) in enumerate(joint.prompts, start=n):
            self.lengths[row] = length
        self._rows = n + len(joint.prompts)

    def abort_joint_step(self) -> None:
        self.joint = None

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
        if keys is None:  # nothing held yet: the layers allocate at their first joint step
            rows = max(rows, 1)
            self.capacity = (rows, -(-max(length, 1) // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)
            self.lengths = torch.zeros(self.capacity[0], dtype=torch.long)
            self.row_index = torch.arange(self.capacity[0])
            return
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
