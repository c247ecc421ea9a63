"""The base of the test backends' instances (gated_backend.py, fault_backend.py): it wraps an
eager instance and hands every call to it, so that a test backend overrides only the calls it
watches and the model keeps its own capabilities (decoding, joint steps, generate)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeserve.backends.base import DecoderState, Instance


class WrappedInstance(Instance):
    def __init__(self, inner: Instance):
        self.inner = inner
        self.device = inner.device

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.run(inputs)

    def generate(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        return self.inner.generate(inputs, **kwargs)

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        return self.inner.prefill(prompts)

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(state, tokens)

    def step(self, state: DecoderState | None, tokens: torch.Tensor,
             prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        return self.inner.step(state, tokens, prompts)

    # What the wrapped instance can do, not what this class overrides (Instance's own test).
    @property
    def supports_generate(self) -> bool:
        return self.inner.supports_generate

    @property
    def supports_decoding(self) -> bool:
        return self.inner.supports_decoding

    @property
    def supports_joint_steps(self) -> bool:
        return self.inner.supports_joint_steps

    @property
    def decoding_unsupported(self) -> str:
        return getattr(self.inner, "decoding_unsupported", "")

    def warm_up(self) -> None:
        self.inner.warm_up()

    def ready(self) -> bool:
        return self.inner.ready()

    def close(self) -> None:
        self.inner.close()
