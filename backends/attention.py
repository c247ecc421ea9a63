"""The attention the eager backend's causal LMs run with while they decode step by step.

`row_attention` is registered with transformers as ROW_ATTENTION; `CausalLMStepper` sets a sdpa
model's attention to it. It is transformers' sdpa attention except for two cases:

    one query per row   a decode step: two matmuls and a softmax over the row's cache columns
                        (`one_query_attention`), cheaper than torch's fused kernel for one query
    a joint step        the step's tokens lie side by side in one sequence (`JointLayout`): a
                        running row's token attends over its row of the cache, a prompt's tokens
                        attend causally over the prompt alone, through sdpa as `generate` runs it

Prompts (many queries per row) still go to sdpa, so a prefill computes what `generate` does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The attention a sdpa model gets here: sdpa, with decode and joint steps computed as below.
ROW_ATTENTION = "pipeserve_rows"
# The attention implementations that take a padding mask, which step-wise decoding needs.
MASKED_ATTENTION = ("sdpa", "eager", ROW_ATTENTION)
# Keyword arguments some models pass that the one-query path does not implement (sdpa handles or refuses them).
_SDPA_ONLY = ("softcap", "position_bias", "s_aux", "sinks")


@dataclass
class JointLayout:
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


@contextlib.contextmanager
def joint_step(layout: JointLayout) -> Iterator[None]:
    """Makes the model's row attention lay this thread's forward out as `layout` says."""
    _current.joint = layout
    try:
        yield
    finally:
        _current.joint = None


def row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except for one query per row (a decode step) and joint steps.
    For one query, torch's fused CPU kernel costs more than it saves: ~1.6 ms a layer for 16 rows
    of GPT-2-small against ~0.5 ms for two matmuls and a softmax, about 15% of the whole step."""
    joint: JointLayout | None = getattr(_current, "joint", None)
    if joint is not None:
        return _joint_attention(joint, module, query, key, value, scaling, kwargs), None
    if query.shape[2] != 1 or any(kwargs.get(name) is not None for name in _SDPA_ONLY):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return one_query_attention(module, query, key, value, attention_mask, scaling), None


def one_query_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
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


def _joint_attention(joint: JointLayout, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """query [1, heads, tokens, head_dim] laid out as `joint` says; key/value: the cache's rows
    (running rows first, then the prompts', all written this step). Returns [1, tokens, heads, head_dim]."""
    unsupported = [name for name in _SDPA_ONLY if kwargs.get(name) is not None]
    if unsupported:
        raise NotImplementedError(f"joint steps do not implement {unsupported}")
    n, parts = joint.running, []
    if n:
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, head_dim]
        parts.append(one_query_attention(module, q, key[:n, :, : joint.width], value[:n, :, : joint.width],
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
