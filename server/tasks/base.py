"""The Task: what turns a pipeline's inputs into tensors and tensors back into its outputs.

A task keeps the shape of transformers' `Pipeline`: `sanitize` (its _sanitize_parameters),
`preprocess`, `forward` (the only step that touches a backend) and `postprocess`. It knows
tokenizers, processors and output shapes; it never sees gRPC, queues or devices.

The scheduler hands a task a batch of inputs that may come from many requests; `run_batch` runs
the four steps on the whole batch in one worker thread and returns one result per input.
Subclass a built-in task and override one step to customise it, as with transformers' pipelines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from pipeserve.backends.base import Instance
from pipeserve.server.errors import InvalidArgument, PipeserveError
from pipeserve.server.repository.model_settings import ModelSettings


@dataclass(frozen=True)
class TaskContext:
    """What a task is built from: the model's settings and where its files are."""

    settings: ModelSettings
    # A local folder or a hub id, as from_pretrained takes it.
    source: str
    revision: str = ""
    hf_config: Any = None

    @property
    def pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.settings.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass(frozen=True)
class TaskParams:
    """Sanitized request parameters, split by the step that uses them.

    Inputs share a batch only when their `pre` and `fwd` are equal; `post` may differ per input.
    """

    pre: Hashable = ()
    fwd: Hashable = ()
    post: Any = field(default=None, compare=False)

    @property
    def batch_key(self) -> Hashable:
        return (self.pre, self.fwd)


# How a task's requests run (ServedModel builds the runtime for it): "batched" inputs go through
# the dynamic batcher and `run_batch`; "generation" inputs are sequences on the continuous batching
# engine, and the task is a `GenerativeTask`.
TASK_KINDS = ("batched", "generation")


class Task:
    """Base class of every task. Subclasses set `name`, `model_class` and the four steps."""

    #: How the task's requests run: one of TASK_KINDS.
    kind: ClassVar[str] = "batched"

    #: Canonical task name, as transformers spells it.
    name: ClassVar[str] = ""
    #: Other names requests and configs may use (e.g. "sentiment-analysis").
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The transformers Auto class the eager backend loads for this task.
    model_class: ClassVar[str] = "AutoModel"
    #: Tensor names sent to and read from the backend (checked by fixed-signature backends).
    input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    output_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, context: TaskContext):
        self.context = context
        self.settings = context.settings

    # -- the four steps -------------------------------------------------------------------------

    def sanitize(self, params: dict[str, Any]) -> TaskParams:
        """Validates request parameters (raising InvalidArgument naming the field)."""
        return TaskParams()

    def check_input(self, index: int, item: Any) -> None:
        """Cheap per-input validation, run before queueing (no tokenization here)."""

    def size(self, item: Any) -> int:
        """A cheap size estimate used to group inputs of similar length into one batch."""
        return len(item) if isinstance(item, (str, bytes)) else 1

    def preprocess(self, inputs: Sequence[Any], pre: Hashable) -> Any:
        """Turns a batch of inputs into model inputs. An error about one input raises
        InvalidArgument("input", why) (or "input.<field>"): the server adds the input's index."""
        raise NotImplementedError

    def forward(self, features: Any, fwd: Hashable, instance: Instance) -> Any:
        return instance.run(features)

    def postprocess(self, inputs: Sequence[Any], features: Any, outputs: Any, posts: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    # -- the batch driver -----------------------------------------------------------------------

    def run_batch(self, instance: Instance, inputs: Sequence[Any], params: Sequence[TaskParams]) -> list[Any]:
        """Runs a batch of inputs that share `batch_key`; returns a result or an exception per input.

        A bad input (one the preprocessing rejects) must not fail its neighbours, so a batch whose
        preprocessing raises is retried input by input.
        """
        pre, fwd = params[0].pre, params[0].fwd
        posts = [p.post for p in params]
        try:
            features = self.preprocess(inputs, pre)
        except PipeserveError as exc:
            if len(inputs) == 1:
                return [exc]
            return [r for i in range(len(inputs)) for r in self.run_batch(instance, inputs[i : i + 1], params[i : i + 1])]
        outputs = self.forward(features, fwd, instance)
        return self.postprocess(inputs, features, outputs, posts)

    # -- helpers shared by tasks ------------------------------------------------------------------

    def defaults(self) -> dict[str, Any]:
        """Request parameter defaults from config.pbtxt (`parameters.defaults`, parsed once)."""
        return dict(self.settings.defaults)

    def with_defaults(self, params: dict[str, Any]) -> dict[str, Any]:
        merged = dict(self.settings.defaults)
        merged.update({k: v for k, v in params.items() if v is not None})
        return merged


@runtime_checkable
class GenerativeTask(Protocol):
    """What a task of kind "generation" gives the generation runtime. A plan factory runs in the
    instance's worker thread when its sequence is admitted (it tokenizes) and returns the
    sequence's `SequencePlan`; raising InvalidArgument fails that sequence alone."""

    name: str

    def sequence_plans(self, inputs: Sequence[Any], params: TaskParams) -> list[list[Callable[[], Any]]]:
        """Per input, one plan factory per sequence to run (num_return_sequences)."""

    def stream_plan(self, item: Any, params: TaskParams) -> Callable[[], Any]:
        """The plan factory of a streamed input's one sequence."""

    def sequence_results(self, inputs: Sequence[Any], params: TaskParams,
                         outcomes: Sequence[Sequence[Any]]) -> list[Any]:
        """Per input, its result shaped as transformers returns it, from its sequences' outcomes."""

    def whole_sequence(self, params: TaskParams) -> bool:
        """Whether a request's parameters need whole-sequence generation (beam search, or what the
        engine's chooser lacks): its inputs then go through the dynamic batcher to `run_batch`,
        which returns each input's sequence outcomes as the engine would (`Instance.generate`)."""

    def run_batch(self, instance: Instance, inputs: Sequence[Any], params: Sequence[TaskParams]) -> list[Any]:
        """Whole-sequence generation of a batch (worker thread): per input, its sequence outcomes."""


class TokenizingTask(Task):
    """A task whose inputs are text run through the model's tokenizer."""

    def __init__(self, context: TaskContext):
        super().__init__(context)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(context.source, **context.pretrained_kwargs)
        self.max_length = self._max_length()
        self.reject_overlong = self.settings.truncation == "reject"

    def _max_length(self) -> int:
        if self.settings.max_sequence_length:
            return self.settings.max_sequence_length
        limit = getattr(self.tokenizer, "model_max_length", None) or 0
        # Tokenizers without a limit report a huge sentinel; fall back to the model's positions.
        if not limit or limit > 1_000_000:
            limit = getattr(self.context.hf_config, "max_position_embeddings", 0) or 512
        return int(limit)

    def check_input(self, index: int, item: Any) -> None:
        if not isinstance(item, str):
            raise InvalidArgument(f"inputs[{index}]", "must be a string")

    def tokenize(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Tokenizes a batch, padding to its longest input and enforcing the config's truncation policy."""
        if self.reject_overlong:
            lengths = self.tokenizer(list(texts), list(text_pairs) if text_pairs else None, truncation=False,
                                     return_length=True, **kwargs)["length"]
            for n in lengths:
                if n > self.max_length:
                    raise InvalidArgument(
                        "input", f"has {n} tokens but the model accepts at most {self.max_length} "
                        "(this model's config sets truncation: TRUNCATION_REJECT); shorten the input")
        return self.tokenizer(
            list(texts), list(text_pairs) if text_pairs else None,
            padding=True, truncation=True, max_length=self.max_length, return_tensors="pt", **kwargs,
        )


def check_int(field_name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer parameter within [low, high]; the error names the field and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field_name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise InvalidArgument(field_name, f"must be in {bound}, got {value}")
    return value


def check_float(field_name: str, value: Any, low: float, high: float | None = None, low_open: bool = False) -> float:
    """A finite float parameter within its range; NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(field_name, f"must be a finite number, got {value!r}")
    if (value <= low if low_open else value < low) or (high is not None and value > high):
        bound = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise InvalidArgument(field_name, f"must be in {bound}, got {value}")
    return float(value)


def local_folder(context: TaskContext) -> Path | None:
    path = Path(context.source)
    return path if path.is_dir() else None
