"""Step-wise decoding of transformers causal LMs for the eager backend: the running batch's cache.

`RowCache` is a transformers `Cache` whose rows are independent sequences of different lengths.
Each layer keeps its keys and values in buffers [rows, heads, capacity, head_dim] with room to
grow; row r holds its tokens at columns [0, length_r), so a decode step writes each row's new
key at its own column (no shifting, no concatenation: `DynamicCache` copies the whole cache on
every step) and attends over [0, max length] with a mask that hides each row's unused columns.
Rows leave by moving the last row into the hole (one row copied, not the batch); rows join by
copying their prompt's keys and values in.

A joint step (`CausalLMStepper.step`) runs the running rows' next tokens and whole new prompts in
ONE forward: the tokens lie side by side in one sequence (one token per running row, then each
prompt's tokens), so every linear layer passes over its weights once for all of them, where a
prefill followed by a decode step would pass twice. Only attention tells them apart (`_Joint`):
a running row's token attends over its row of the cache, a prompt's tokens attend causally over
the prompt alone, through sdpa exactly as `model.generate` runs a prompt. Decode steps then
differ from `generate`'s only by the padding columns a mask hides and by the rounding of matrix
products with more rows.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pipeserve.backends.base import DecoderState
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# Capacity grows in steps of this many positions, so that buffers are not reallocated every step.
_LENGTH_QUANTUM = 64
# The attention a sdpa model gets here: sdpa, with decode steps computed as below.
ROW_ATTENTION = "pipeserve_rows"
_MASKED_ATTENTION = ("sdpa", "eager", ROW_ATTENTION)
# Keyword arguments some models pass that the one-query path does not implement (sdpa handles or refuses them).
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass
class _Joint:
    """Where the tokens of a joint step lie in its one sequence: first one token for each of the
    `running` rows (row i at position i), then each new prompt's tokens; prompt j becomes row
    `running + j`."""

    running: int
    # Additive mask [running, 1, 1, width] over the running rows' cache columns.
    mask: torch.Tensor | None
    width: int
    # (offset in the sequence, length) of each new prompt.
    prompts: list[tuple[int, int]]


# The joint step the current thread is running (each instance steps in its own worker thread).
_current = threading.local()


def row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except for one query per row (a decode step) and joint steps.
    For one query, torch's fused CPU kernel costs more than it saves: ~1.6 ms a layer for 16 rows
    of GPT-2-small against ~0.5 ms for two matmuls and a softmax, about 15% of the whole step.
    Prompts (many queries per row) still go to sdpa, so a prefill computes what `generate` does."""
    joint: _Joint | None = getattr(_current, "joint", None)
    if joint is not None:
        return _joint_attention(joint, module, query, key, value, scaling, kwargs), None
    if query.shape[2] != 1 or any(kwargs.get(name) is not None for name in _SDPA_ONLY):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return _one_query_attention(module, query, key, value, attention_mask, scaling), None


def _one_query_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """query [rows, heads, 1, head_dim] over key/value [rows, kv_heads, width, head_dim]; returns
    [rows, 1, heads, head_dim]."""
    rows, heads, _, head_dim = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    # Query heads that share a key/value head sit side by side, as if they were that head's queries.
    q = query.reshape(rows, heads // groups, groups, head_dim)
    scores = torch.matmul(q, key.transpose(-1, -2))
    scores *= scaling if scaling is not None else head_dim ** -0.5
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores += mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(probs, value).reshape(rows, heads, 1, head_dim).transpose(1, 2)


def _joint_attention(joint: _Joint, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """query [1, heads, tokens, head_dim] laid out as `joint` says; key/value: the cache's rows
    (running rows first, then the prompts', all written this step). Returns [1, tokens, heads, head_dim]."""
    unsupported = [name for name in _SDPA_ONLY if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"joint steps do not implement {unsupported}")
    n, parts = joint.running, []
    if n:
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, head_dim]
        parts.append(_one_query_attention(module, q, key[:n, :, : joint.width], value[:n, :, : joint.width],
                                          joint.mask, scaling).squeeze(1))
    for row, (offset, length) in enumerate(joint.prompts, start=n):
        out, _ = sdpa_attention_forward(module, query[:, :, offset : offset + length], key[row : row + 1, :, :length],
                                        value[row : row + 1, :, :length], None, scaling=scaling, is_causal=True)
        parts.append(out[0])  # [length, heads, head_dim]
    return torch.cat(parts).unsqueeze(0)


def additive_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, width] of valid columns as the [rows, 1, 1, width] mask that attention adds to its
    scores: 0 where a row may attend, the dtype's lowest value where it may not."""
    return torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, torch.finfo(dtype).min)[:, None, None, :]


AttentionInterface.register(ROW_ATTENTION, row_attention)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)


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

    def _update_joint(self, joint: _Joint, key_states: torch.Tensor, value_states: torch.Tensor):
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
        self.joint: _Joint | None = None
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

    def begin_joint_step(self, prompt_lengths: Sequence[int], mask_dtype: torch.dtype) -> _Joint:
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
        self.joint = _Joint(n, mask, self.width, offsets)
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
        if self._attention() == "sdpa":
            model.set_attn_implementation(ROW_ATTENTION)
        self.num_layers = config.num_hidden_layers
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

    def check(self, device: torch.device) -> None:
        """Runs a two-token prompt and one decode step, so that a model whose code does not fit the
        row cache (Bloom's ALiBi attention, say) fails at load with the reason, not on every request."""
        vocab = self.model.config.get_text_config(decoder=True).vocab_size
        prompt = [0, min(1, vocab - 1)]
        try:
            if self.joins_prompts:
                logits, state = self.step(None, torch.zeros(0, dtype=torch.long), [prompt], device)
                self.step(state, logits.argmax(-1), [], device)
            else:
                logits, state = self.prefill([prompt], device)
                self.decode(state, logits.argmax(-1), device)
        except NotImplementedError:
            raise
        except Exception as exc:
            raise NotImplementedError(f"step-wise decoding does not work with {type(self.model).__name__}: "
                                      f"{type(exc).__name__}: {exc}") from exc

    @property
    def joins_prompts(self) -> bool:
        """Joint steps need the row attention (sdpa models get it; an "eager" model keeps its own)."""
        return self.model.config._attn_implementation == ROW_ATTENTION

    def step(self, state: RowCache | None, tokens: torch.Tensor, prompts: Sequence[Sequence[int]],
             device: torch.device) -> tuple[torch.Tensor, RowCache]:
        """One forward for every running row of `state` (its newest token in `tokens`) and every new
        prompt (module docstring). Returns logits [rows + prompts, vocab] and the state, the prompts
        now its last rows."""
        if not self.joins_prompts:
            raise NotImplementedError(f"joint steps need {ROW_ATTENTION!r} attention; this model uses "
                                      f"{self.model.config._attn_implementation!r}")
        state = state if state is not None else RowCache(self.num_layers)
        n = state.rows
        if tokens.numel() != n:
            raise ValueError(f"{tokens.numel()} tokens for {n} running rows")
        dtype = next(self.model.parameters()).dtype
        joint = state.begin_joint_step([len(p) for p in prompts], dtype)
        if joint.mask is not None:
            joint.mask = joint.mask.to(device)
        ids = [tokens.view(-1)] + [torch.tensor(list(p), dtype=torch.long) for p in prompts]
        positions = [state.lengths[:n]] + [torch.arange(len(p)) for p in prompts]
        keep = list(range(n)) + [offset + length - 1 for offset, length in joint.prompts]
        inputs: dict[str, Any] = {
            "input_ids": torch.cat(ids)[None].to(device),
            "position_ids": torch.cat(positions)[None].to(device),
            # Attention comes from the layout (`_Joint`); a 4D mask keeps transformers from building one.
            "attention_mask": torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
            self.cache_argument: state,
        }
        if self.logits_to_keep:
            inputs["logits_to_keep"] = torch.tensor(keep, device=device)
        _current.joint = joint
        try:
            outputs = self.model(**inputs, use_cache=True, return_dict=True)
        except BaseException:
            state.abort_joint_step()
            raise
        finally:
            _current.joint = None
        state.end_joint_step()
        logits = outputs.logits[0]
        if not self.logits_to_keep:
            logits = logits[keep]
        return logits.to(dtype=torch.float32, device="cpu", copy=True), state

    def decode(self, state: RowCache, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
        n = state.rows
        valid = state.begin_step()
        if self._attention() == "sdpa":
            mask = valid[:, None, None, :]  # True: attend
        else:
            mask = additive_mask(valid, next(self.model.parameters()).dtype)
        position_ids = state.lengths[:n, None].clone()
        logits = self._forward(
            input_ids=tokens.view(n, 1).to(device), attention_mask=mask.to(device),
            position_ids=position_ids.to(device), **{self.cache_argument: state},
        )
        state.end_step()
        return logits
