"""Step-wise decoding of transformers causal LMs for the eager backend: prefill, decode and joint steps.

A joint step (`CausalLMStepper.step`) runs the running rows' next tokens and whole new prompts in
ONE forward: the tokens lie side by side in one sequence (one token per running row, then each
prompt's tokens), so every linear layer passes over its weights once for all of them, where a
prefill followed by a decode step would pass twice. Only attention tells them apart (attention.py):
a running row's token attends over its row of the cache (`RowCache`, row_cache.py), a prompt's
tokens attend causally over the prompt alone, through sdpa exactly as `model.generate` runs a
prompt. Decode steps then differ from `generate`'s only by the padding columns a mask hides and
by the rounding of matrix products with more rows.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from pipeserve.backends.attention import MASKED_ATTENTION, ROW_ATTENTION, additive_mask, joint_step
from pipeserve.backends.row_cache import RowCache
from transformers import DynamicCache


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
        if implementation not in MASKED_ATTENTION:
            raise NotImplementedError(
                f"step-wise decoding needs attention that takes a padding mask ({', '.join(MASKED_ATTENTION)}); "
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
            # Attention comes from the layout (`JointLayout`); a 4D mask keeps transformers from building one.
            "attention_mask": torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
            self.cache_argument: state,
        }
        if self.logits_to_keep:
            inputs["logits_to_keep"] = torch.tensor(keep, device=device)
        try:
            with joint_step(joint):
                outputs = self.model(**inputs, use_cache=True, return_dict=True)
        except BaseException:
            state.abort_joint_step()
            raise
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
