"""The model an export starts from: an eager model of the repository, its task, and its tensors.

The export is generic over tasks: the inputs are the names the task declares plus those its
tokenizer or image processor produces (the same dict the server hands a backend), kept where the
model's forward takes them; the outputs are every tensor the eager model returns, in its order,
so that an exported model answers `Instance.run` with the same dict the eager backend does.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeserve.backends.base import ModelSpec
from pipeserve.backends.eager import EagerBackend
from pipeserve.backends.registry import backend_names
from pipeserve.server.errors import PipeserveError
from pipeserve.server.export.versions import has_model_config
from pipeserve.server.repository.config import read_model_config_fields
from pipeserve.server.repository.model_settings import ModelSettings
from pipeserve.server.repository.repository import ModelRepository, ModelVersionSource
from pipeserve.server.tasks.base import TaskContext
from pipeserve.server.tasks.registry import canonical_task_name, task_class, task_names

log = logging.getLogger("pipeserve.export")

# Transformers classes of generation tasks (exported, where at all, as a step without a KV cache).
GENERATION_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")

# Files of a model folder that an export does not copy: weights (the export replaces them) and
# the serving config (the exported model gets its own).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".plan")
_NOT_COPIED_NAMES = ("config.pbtxt",)

# Example batches: one to trace with (padding in the last row) and one of other sizes to check
# that the export did not freeze a shape. (Decoder lengths: for decoder_* inputs.)
TRACE_BATCH, TRACE_LENGTH, TRACE_DECODER_LENGTH = 2, 8, 4
CHECK_BATCH, CHECK_LENGTH, CHECK_DECODER_LENGTH = 3, 5, 6


class ExportError(PipeserveError):
    """The model cannot be exported as asked; the message says why and what to do."""

    code = "FAILED_PRECONDITION"


@dataclass
class ExportSource:
    """An eager model of the repository, loaded on CPU as the server loads it, with its signature."""

    repository: ModelRepository
    settings: ModelSettings
    # Its config.pbtxt's fields as written (no defaults filled in): what an export's own config
    # starts from (versions.sibling_config).
    config_fields: dict[str, Any]
    version: ModelVersionSource
    task_name: str
    model_class: str
    model: torch.nn.Module
    hf_config: Any
    processor: Any
    input_names: tuple[str, ...]
    # Tensors the preprocessor makes that the model does not take: an export drops them too.
    ignored_inputs: tuple[str, ...]
    # Names the task always sends, and those it reads; every export must take and give them.
    task_input_names: tuple[str, ...]
    task_output_names: tuple[str, ...]

    @classmethod
    def open(cls, repository: Path, name: str, version: int = 0) -> ExportSource:
        """Loads model `name` (its newest selected version, or `version`) of the repository."""
        from transformers import AutoConfig

        repo = ModelRepository(Path(repository))
        settings, path = repo.read_settings(name, task_names(), backend_names())
        if settings.backend != "eager":
            raise ExportError(f"model {name!r} is served by backend {settings.backend!r}; an export starts from an "
                              "eager model (its transformers weights)")
        sources = repo.version_sources(name, settings, path)
        if version:
            sources = [s for s in sources if s.version == version]
            if not sources:
                raise ExportError(f"model {name!r} has no version {version} selected by its version_policy")
        source = sources[-1]
        where = str(source.local_path) if source.local_path is not None else source.hub_id
        hf_config = AutoConfig.from_pretrained(where, **settings.pretrained_kwargs)
        task_cls = task_class(settings.task)
        task = task_cls(TaskContext(settings=settings, source=where, revision=source.revision, hf_config=hf_config))
        model_class = getattr(task, "model_class", task_cls.model_class)
        spec = ModelSpec(
            name=name, version=source.version, local_path=source.local_path, hub_id=source.hub_id,
            revision=source.revision, model_class=model_class, parameters=dict(settings.backend_parameters),
            trust_remote_code=settings.trust_remote_code, input_names=task_cls.input_names,
            output_names=task_cls.output_names,
        )
        # The eager backend itself loads it: the export traces exactly what eager serving runs.
        model = EagerBackend().load(spec, torch.device("cpu")).model  # type: ignore[attr-defined]
        model.eval()
        processor = _preprocessor(task)
        accepted = inspect.signature(model.forward).parameters
        wanted = list(task_cls.input_names) + list(getattr(processor, "model_input_names", []) or [])
        names = tuple(dict.fromkeys(n for n in wanted if n in accepted))
        # What the preprocessor makes but forward does not name (it may swallow them in **kwargs).
        ignored = tuple(dict.fromkeys(n for n in wanted if n not in accepted))
        missing = [n for n in task_cls.input_names if n not in names]
        if missing:
            raise ExportError(f"{type(model).__name__}.forward takes no {missing}, which task {settings.task!r} sends")
        return cls(repo, settings, read_model_config_fields(path), source,
                   canonical_task_name(settings.task) or settings.task, model_class, model, hf_config, processor,
                   names, ignored, tuple(task_cls.input_names), tuple(task_cls.output_names))

    def target(self, name: str, suffix: str, backend: str) -> tuple[str, Path, bool]:
        """Where an export served by `backend` goes: its model name (`name`, default `<model>-<suffix>`),
        that model's folder in the repository, and whether the folder has a config.pbtxt already
        (kept; one for another backend is an ExportError, raised before anything is written)."""
        model = self.settings.name
        name = name or f"{model}-{suffix}"
        if name == model:
            raise ExportError("the export must go to another model than its source (see --name)")
        folder = self.repository.root / name
        try:
            return name, folder, has_model_config(folder, backend)
        except ValueError as exc:
            raise ExportError(str(exc)) from exc

    @property
    def label(self) -> str:
        return f"{self.settings.name}/{self.version.version}"

    @property
    def is_generation(self) -> bool:
        return self.model_class in GENERATION_CLASSES

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every traced call passes: no KV cache (its outputs are not tensors)."""
        accepted = inspect.signature(self.model.forward).parameters
        return {"use_cache": False} if "use_cache" in accepted else {}

    # -- example batches ----------------------------------------------------------------------------

    def example_inputs(self, check: bool = False) -> dict[str, torch.Tensor]:
        """A batch with every input: the trace batch, or (check=True) one of other sizes."""
        batch, length, decoder_length = ((CHECK_BATCH, CHECK_LENGTH, CHECK_DECODER_LENGTH) if check
                                         else (TRACE_BATCH, TRACE_LENGTH, TRACE_DECODER_LENGTH))
        generator = torch.Generator().manual_seed(1 if check else 0)
        return {name: self._example(name, batch, decoder_length if name.startswith("decoder_") else length, generator)
                for name in self.input_names}

    def _example(self, name: str, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        hf = self.hf_config
        if name == "pixel_values":
            channels = getattr(hf, "num_channels", 3)
            height, width = self._image_size()
            return torch.randn(batch, channels, height, width, generator=generator)
        if name.endswith("attention_mask"):
            mask = torch.ones(batch, length, dtype=torch.long)
            mask[-1, max(1, length // 2):] = 0  # one padded row: the mask must reach the attention
            return mask
        if name == "token_type_ids":
            types = torch.zeros(batch, length, dtype=torch.long)
            if getattr(hf, "type_vocab_size", 1) > 1:
                types[0, length // 2:] = 1  # a sentence pair
            return types
        if name.endswith("input_ids"):
            vocab = getattr(hf, "vocab_size", None) or getattr(getattr(hf, "text_config", None), "vocab_size", 100)
            return torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=generator)
        raise ExportError(f"the export cannot make an example for input {name!r} of {type(self.model).__name__}; "
                          "serve this model with backend eager")

    def _image_size(self) -> tuple[int, int]:
        size = getattr(self.processor, "size", None) or {}
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        image_size = getattr(self.hf_config, "image_size", 224)
        if isinstance(image_size, (list, tuple)):
            return int(image_size[0]), int(image_size[1])
        return int(image_size), int(image_size)

    # -- running it ---------------------------------------------------------------------------------

    def eager_outputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the eager backend returns for `inputs`: every tensor output, in the model's order."""
        with torch.inference_mode():
            outputs = self.model(**inputs, return_dict=True, **self.call_kwargs)
        return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor)}

    def output_names(self) -> tuple[str, ...]:
        names = tuple(self.eager_outputs(self.example_inputs()))
        missing = [n for n in self.task_output_names if n not in names]
        if missing:
            raise ExportError(f"{type(self.model).__name__} returns {list(names)}, not {missing} that task "
                              f"{self.task_name!r} reads")
        return names

    def copy_support_files(self, dest: Path) -> None:
        """Copies what the task needs besides weights (config.json, tokenizer or processor files)."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.version.local_path is None:  # a hub model: write them from what was loaded
            self.hf_config.save_pretrained(dest)
            if self.processor is not None:
                self.processor.save_pretrained(dest)
            return
        for path in sorted(Path(self.version.local_path).iterdir()):
            if (path.is_file() and not path.name.startswith(".") and path.name not in _NOT_COPIED_NAMES
                    and not path.name.endswith(_NOT_COPIED_SUFFIXES) and not path.name.endswith(".index.json")):
                shutil.copy2(path, dest / path.name)


class NamedOutputs(torch.nn.Module):
    """The model as tracers want it: positional tensors in (in `input_names` order), a tuple out."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 call_kwargs: dict[str, Any]):
        super().__init__()
        self.model = model
        self.input_names = input_names
        self.output_names = output_names
        self.call_kwargs = call_kwargs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(**dict(zip(self.input_names, tensors)), return_dict=True, **self.call_kwargs)
        return tuple(outputs[name] for name in self.output_names)


def wrap(source: ExportSource, output_names: tuple[str, ...]) -> NamedOutputs:
    # eval() on the wrapper too: a module's train() flag is set recursively by exporters that restore it.
    return NamedOutputs(source.model, source.input_names, output_names, source.call_kwargs).eval()


def _preprocessor(task: Any) -> Any:
    for attr in ("tokenizer", "processor", "image_processor", "feature_extractor"):
        value = getattr(task, attr, None)
        if value is not None and hasattr(value, "model_input_names"):
            return value
    return None


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float((a[name].float() - b[name].float()).abs().max()) if a[name].numel() else 0.0 for name in a}
