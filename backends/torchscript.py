"""The TorchScript backend: serves `pipeserve export --backend torchscript` output with torch.jit.load.

An exported version folder holds

    model.pt          the traced model: positional tensors in, a tuple of tensors out
    torchscript.json  its signature (TorchScriptSignature): input and output names in order,
                      defaults for optional inputs, and what it was exported from
    config.json, tokenizer files ...   for the task's pre- and post-processing

No transformers model code runs at serving time: this module imports torch only.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeserve.backends.base import Backend, DecoderState, Instance, ModelSpec

MODEL_FILE = "model.pt"
SIGNATURE_FILE = "torchscript.json"
SIGNATURE_FORMAT = "pipeserve-torchscript/1"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "int64"
    # For an input the task may leave out: "zeros" or "ones" shaped like `like` (e.g. token_type_ids
    # as zeros like input_ids, which is what the transformers model assumes when it is absent).
    default: str = ""
    like: str = ""


@dataclass(frozen=True)
class TorchScriptSignature:
    """What model.pt takes and returns, in positional order; written by the exporter."""

    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    # Tensors the task's preprocessor makes that the model's forward does not take (as eager, which
    # lets forward's **kwargs swallow them): dropped, where any other unknown input is an error.
    ignored_inputs: tuple[str, ...] = ()
    task: str = ""
    # Where the export came from ("sentiment/1"), and the transformers class traced: for people.
    exported_from: str = ""
    model_class: str = ""
    # "encoder": one forward per batch. "decoder-step": a causal LM without a KV cache: logits for
    # every position of the ids given, which prefill/decode run again over the whole sequence.
    kind: str = "encoder"
    torch_version: str = ""
    format: str = SIGNATURE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / SIGNATURE_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: Path) -> TorchScriptSignature:
        path = Path(folder) / SIGNATURE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot be read ({exc}); export the model with "
                             "`pipeserve export --backend torchscript MODEL`") from exc
        if data.get("format") != SIGNATURE_FORMAT:
            raise ValueError(f"{path}: format {data.get('format')!r} is not {SIGNATURE_FORMAT!r}; export again")
        data["inputs"] = tuple(InputSpec(**i) for i in data["inputs"])
        data["outputs"] = tuple(data["outputs"])
        data["ignored_inputs"] = tuple(data.get("ignored_inputs", ()))
        return cls(**data)


def retarget_device_constants(module: torch.jit.ScriptModule, device: torch.device) -> int:
    """Points the device constants a trace recorded (e.g. "cpu" in `torch.arange(n, device=x.device)`)
    at `device`, so that a CPU export runs on cuda:N. Returns how many were changed.

    Tracing records `x.device` as a constant; without this, an op that makes a new tensor would
    make it on the export's device and fail beside inputs on another one.
    """
    changed = 0
    for sub in module.modules():
        method = getattr(sub, "forward", None)
        graph = getattr(method, "graph", None)
        if graph is None:
            continue
        for node in graph.findAllNodes("prim::Constant"):
            out = node.output()
            if out.type().kind() != "DeviceObjType" or node.s("value") == str(device):
                continue
            replacement = graph.insertConstant(device)
            replacement.node().moveBefore(node)
            out.replaceAllUsesWith(replacement)
            node.destroy()
            changed += 1
    return changed


class RecomputedState(DecoderState):
    """Decoding without a KV cache: the state is each row's token ids, and every step runs the
    traced model over the whole sequences again (right-padded: a causal model's real positions
    never see the padding after them)."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = sequences

    @property
    def rows(self) -> int:
        return len(self.sequences)

    def extend(self, other: DecoderState) -> None:
        assert isinstance(other, RecomputedState)
        self.sequences.extend(other.sequences)
        other.sequences = []

    def release(self, rows: Sequence[int]) -> list[int]:
        gone = set(rows)
        order = [i for i in range(len(self.sequences)) if i not in gone]
        self.sequences = [self.sequences[i] for i in order]
        return order


class TorchScriptInstance(Instance):
    def __init__(self, module: torch.jit.ScriptModule, signature: TorchScriptSignature, device: torch.device):
        self.module = module
        self.signature = signature
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._known = set(signature.input_names) | set(signature.ignored_inputs)

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _positional(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        unexpected = sorted(set(inputs) - self._known)
        if unexpected:
            raise ValueError(f"the TorchScript model takes {list(self.signature.input_names)}; "
                             f"got unexpected {unexpected} (export the model again for this task)")
        tensors = []
        for spec in self.signature.inputs:
            value = inputs.get(spec.name)
            if value is None:
                if not spec.default or spec.like not in inputs:
                    raise ValueError(f"the TorchScript model needs input {spec.name!r}; got {sorted(inputs)}")
                like = inputs[spec.like]
                value = torch.zeros_like(like) if spec.default == "zeros" else torch.ones_like(like)
            tensors.append(value.to(self.device, non_blocking=True) if self.device.type != "cpu" else value)
        return tensors

    def _forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The outputs by name, on the instance's device; call inside inference mode and the stream."""
        outputs = self.module(*self._positional(inputs))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return dict(zip(self.signature.outputs, outputs))

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode(), self._on_stream():
            return {name: v.float().cpu() if v.is_floating_point() else v.cpu()
                    for name, v in self._forward(inputs).items()}

    # -- generation: step-wise decoding without a KV cache (decoder-step exports) ---------------------

    @property
    def supports_decoding(self) -> bool:
        return self.signature.kind == "decoder-step"

    def prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecoderState]:
        state = RecomputedState([[int(t) for t in p] for p in prompts])
        return self._last_logits(state.sequences), state

    def decode(self, state: DecoderState, tokens: torch.Tensor) -> torch.Tensor:
        assert isinstance(state, RecomputedState)
        for sequence, token in zip(state.sequences, tokens.tolist()):
            sequence.append(int(token))
        return self._last_logits(state.sequences)

    def _last_logits(self, sequences: list[list[int]]) -> torch.Tensor:
        """Next-token logits [rows, vocab] of each sequence, from one padded forward."""
        if not self.supports_decoding:
            raise NotImplementedError(f"this TorchScript export ({self.signature.kind}) has no generation step")
        lengths = torch.tensor([len(s) for s in sequences])
        input_ids = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask = (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.inference_mode(), self._on_stream():
            logits = self._forward({"input_ids": input_ids, "attention_mask": mask})["logits"]
            # Only each row's last position leaves the device.
            rows = torch.arange(len(sequences), device=logits.device)
            return logits[rows, (lengths - 1).to(logits.device)].float().cpu()

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class TorchScriptBackend(Backend):
    """Loads `model.pt` from the version folder with torch.jit.load onto the instance's device."""

    name = "torchscript"

    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        if spec.local_path is None:
            raise ValueError("backend torchscript serves an exported folder; source must be a local path, not a hub id")
        folder = Path(spec.local_path)
        signature = TorchScriptSignature.read(folder)
        missing_inputs = [n for n in spec.input_names if n not in signature.input_names]
        missing_outputs = [n for n in spec.output_names if n not in signature.outputs]
        if missing_inputs or missing_outputs:
            raise ValueError(
                f"{folder / SIGNATURE_FILE}: the task needs inputs {list(spec.input_names)} and outputs "
                f"{list(spec.output_names)}, but the export has {list(signature.input_names)} -> "
                f"{list(signature.outputs)}; export the model again for this task")
        path = folder / MODEL_FILE
        if not path.is_file():
            raise ValueError(f"{path} is missing; export the model with `pipeserve export --backend torchscript`")
        if signature.kind == "decoder-step" and "decoder_input_ids" in signature.input_names:
            raise ValueError(f"{folder / SIGNATURE_FILE}: backend torchscript cannot serve encoder-decoder "
                             "generation (it needs generate() with a KV cache); use backend eager")
        with warnings.catch_warnings():
            # torch 2.13 marks TorchScript deprecated in favour of torch.export; it is still the
            # format that loads without Python model code, which is this backend's point.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
        module.eval()
        retarget_device_constants(module, device)
        return TorchScriptInstance(module, signature, device)
