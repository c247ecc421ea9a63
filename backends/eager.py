"""The eager PyTorch backend: transformers models run as they are, one CUDA stream per instance."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from pipeserve.backends.base import Backend, DecoderState, Instance, ModelSpec
from pipeserve.backends.cpu_matmul import MODES as MATMUL_MODES

if TYPE_CHECKING:
    from pipeserve.backends.stepper import CausalLMStepper

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EagerInstance(Instance):
    def __init__(self, model: torch.nn.Module, device: torch.device, cpu_matmul: str = "torch",
                 matmul_threads: int | None = None, step_wise: bool = True):
        self.model = model
        self.device = device
        # How CPU linear layers multiply (cpu_matmul.py): settled by warm_up, in the worker thread,
        # whose thread counts the timing must see.
        self._cpu_matmul = cpu_matmul if device.type == "cpu" else "torch"
        self._matmul_threads = matmul_threads
        # Step-wise decoding (text-generation), for a model loaded as a causal LM (`step_wise`).
        # Whether the model decodes through the row cache is found by decoding a token, a forward:
        # warm_up does it in the worker thread, so that `supports_decoding` only reads the result.
        self._step_wise = step_wise
        self._stepper: CausalLMStepper | None = None
        self._decoding_checked = False
        self.decoding_unsupported = "" if step_wise else "the model was not loaded as a causal LM"
        # Each GPU instance queues its work on its own stream so that instances sharing a GPU overlap.
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return inputs
        return {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}

    def warm_up(self) -> None:
        if self._cpu_matmul != "torch":
            from pipeserve.backends.cpu_matmul import route_linear_layers

            route_linear_layers(self.model, self._cpu_matmul, self._matmul_threads)
        # After the routing, so that the check decodes through the layers that requests run.
        self.check_decoding()

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), self._on_stream():
            outputs = self.model(**self._to_device(inputs), return_dict=True)
            result = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                      for k, v in outputs.items() if isinstance(v, torch.Tensor)}
        return result

    def generate(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        with torch.inference_mode(), self._on_stream():
            return self.model.generate(**self._to_device(inputs), **kwargs).cpu()

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        with torch.inference_mode(), self._on_stream():
            return self._decoder().prefill(prompts, self.device)

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self._on_stream():
            return self._decoder().decode(state, tokens, self.device)

    def step(self, state: DecoderState | None, tokens: torch.Tensor,
             prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        with torch.inference_mode(), self._on_stream():
            return self._decoder().step(state, tokens, prompts, self.device)

    @property
    def supports_joint_steps(self) -> bool:
        return self.supports_decoding and self._decoder().joins_prompts

    @property
    def supports_decoding(self) -> bool:
        """True for the causal LMs the RowCache path handles; else the reason is in `decoding_unsupported`.
        Cheap once warm_up has checked (an instance made without it checks at the first ask)."""
        return self.check_decoding()

    def check_decoding(self) -> bool:
        """Once: whether the model decodes step by step through the row cache, found by decoding a
        token (`CausalLMStepper.check`), so that a model whose attention does not fit (Bloom) fails
        to load with the reason (kept in `decoding_unsupported`) instead of failing every request."""
        if not self._step_wise:
            return False
        if not self._decoding_checked:
            from pipeserve.backends.stepper import CausalLMStepper

            try:
                stepper = CausalLMStepper(self.model)
                with torch.inference_mode(), self._on_stream():
                    stepper.check(self.device)
            except NotImplementedError as exc:
                self.decoding_unsupported = str(exc)
            else:
                self._stepper = stepper
            self._decoding_checked = True
        return self._stepper is not None

    def _decoder(self) -> CausalLMStepper:
        if not self.check_decoding():
            raise NotImplementedError(self.decoding_unsupported)
        assert self._stepper is not None
        return self._stepper

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# Files that hold weights as a pickle (torch.save); a pickle can run any code when it is read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def refuse_pickled_weights(folder: Path) -> None:
    """Says clearly why a folder whose only weights are pickles does not load."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"{folder} holds weights only as pickle files ({', '.join(pickled)}); pipeserve loads local weights "
            "from safetensors only and never unpickles a file from the repository: convert them to "
            "model.safetensors (e.g. save_pretrained with safetensors) and remove the pickles")


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
            # (Hub weights go through transformers' torch.load(weights_only=True) where no
            # safetensors exist.)
            refuse_pickled_weights(spec.local_path)
            kwargs["use_safetensors"] = True
        model = model_class.from_pretrained(source, **kwargs)
        model.to(device).eval()
        cpu_matmul = spec.parameters.get("cpu_matmul", "auto")
        if cpu_matmul not in MATMUL_MODES:
            raise ValueError(f"backend_parameters.cpu_matmul must be one of {', '.join(MATMUL_MODES)}, "
                             f"got {cpu_matmul!r}")
        threads = spec.parameters.get("matmul_threads", "")
        if threads and (not threads.isdigit() or int(threads) < 1):
            raise ValueError(f"backend_parameters.matmul_threads must be a whole number >= 1, got {threads!r}")
        # Only a causal LM (text-generation's class) decodes step by step; warm_up checks that it can.
        return EagerInstance(model, device, cpu_matmul, int(threads) if threads else None,
                             step_wise=spec.model_class == "AutoModelForCausalLM")
