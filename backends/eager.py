"""The eager PyTorch backend: transformers models run as they are, one CUDA stream per instance."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import transformers

from pipeserve.backends.base import Backend, Instance, ModelSpec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EagerInstance(Instance):
    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        # Each GPU instance queues its work on its own stream so that instances sharing a GPU overlap.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return inputs
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), self._on_stream():
            outputs = self.model(**self._to_device(inputs), return_dict=True)
            result = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                      for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        return result

    def generate(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode(), self._on_stream():
            return self.model.generate(**self._to_device(inputs), **kwargs).cpu()

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class EagerBackend(Backend):
    """Loads `spec.model_class` from transformers with from_pretrained and runs it eagerly."""

    name = "eager"

    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        model_class = getattr(transformers, spec.model_class, None)
        if model_class is None:
            raise ValueError(f"transformers has no class {spec.model_class!r}")
        dtype = _DTYPES.get(spec.parameters.get("dtype", "float32"))
        if dtype is None:
            raise ValueError(f"backend_parameters.dtype must be one of {sorted(_DTYPES)}")
        source = str(spec.local_path) if spec.local_path is not None else spec.hub_id
        kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "dtype": dtype}
        if spec.revision:
            kwargs["revision"] = spec.revision
        if spec.local_path is not None:
            # Local weights load only from safetensors: never unpickle a file from the repository.
            kwargs["use_safetensors"] = True
        model = model_class.from_pretrained(source, **kwargs)
        model.to(device).eval()
        return EagerInstance(model, device)
