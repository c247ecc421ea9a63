"""What every v2 codec is made of: tensor specs, a model's signature, the codec interface, and the
helpers that check a request against a signature and shape results into tensors.

A codec turns a request's named numpy arrays and parameters into the task's Python inputs and
parameters (what `DataPlane.infer` takes), and the task's results back into named numpy arrays.
The first dimension of every tensor is the request's inputs, one row per input. The codecs of
the built-in tasks are in kserve_*_codecs.py; kserve_codecs.py finds a model's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeserve.server.adapters.kserve_tensors import utf8_strings
from pipeserve.server.control_plane import ModelDescription
from pipeserve.server.errors import InvalidArgument


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    # -1: any size. The first dimension is the number of inputs in the request.
    shape: tuple[int, ...]
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class V2Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Request parameters the task takes, with what they mean; None: any, passed to the task as sent.
    parameters: dict[str, str] | None
    # One request, many responses (token streaming): Triton's decoupled transaction policy.
    decoupled: bool = False

    def input(self, name: str) -> TensorSpec | None:
        return next((s for s in self.inputs if s.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((s for s in self.outputs if s.name == name), None)


class TaskCodec:
    """Translates between v2 tensors and one task's Python inputs and results."""

    #: The registered task name this codec serves (and, through their bases, the tasks derived from it).
    task: ClassVar[str] = ""
    #: Parameters that take a list, which v2 sends as one string (see `text_list`).
    list_parameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: ModelDescription):
        self.model = model
        self.signature = self.build_signature()

    def build_signature(self) -> V2Signature:
        raise NotImplementedError

    def decode(self, tensors: dict[str, np.ndarray], params: dict[str, Any],
               requested: set[str]) -> tuple[list[Any], dict[str, Any]]:
        """(inputs, task parameters) from checked tensors; `requested` names the outputs asked for.
        By default: one TEXT per input."""
        params = self.parameters(params)
        return utf8_strings(tensors["TEXT"], "TEXT"), params

    def encode(self, results: list[Any], params: dict[str, Any]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def parameters(self, params: dict[str, Any]) -> dict[str, Any]:
        """The request's parameters as the task takes them: a copy, with the list parameters parsed."""
        params = dict(params)
        for key in self.list_parameters:
            if key in params:
                params[key] = text_list(params[key])
        return params

    def config_default(self, key: str) -> Any:
        """A request parameter's default from config.pbtxt (parsed as the task parses it), or None."""
        return self.model.defaults.get(key)


TEXT = TensorSpec("TEXT", "BYTES", (-1,), doc="one UTF-8 text per input")


def check_tensors(signature: V2Signature, tensors: Sequence[tuple[str, str, Sequence[int]]]) -> int:
    """Checks the request's (name, datatype, shape) against the signature, before any decoding;
    returns the number of inputs (the first dimension, equal across tensors)."""
    expected = ", ".join(f"{s.name} {s.datatype} {list(s.shape)}" + (" (optional)" if s.optional else "")
                         for s in signature.inputs)
    names = [name for name, _, _ in tensors]
    for name in names:
        if signature.input(name) is None:
            raise InvalidArgument(f"input {name}", f"is not an input of this model; its inputs: {expected}")
        if names.count(name) > 1:
            raise InvalidArgument(f"input {name}", "is sent more than once")
    for spec in signature.inputs:
        if spec.name not in names and not spec.optional:
            raise InvalidArgument(f"input {spec.name}", f"is required; this model's inputs: {expected}")
    rows = None
    for name, datatype, shape in tensors:
        spec = signature.input(name)
        assert spec is not None
        if datatype != spec.datatype:
            raise InvalidArgument(f"input {name}", f"datatype {datatype} does not match {spec.datatype}")
        shape = list(shape)
        if len(shape) != len(spec.shape) or any(want not in (-1, got) for want, got in zip(spec.shape, shape)):
            raise InvalidArgument(
                f"input {name}", f"shape {shape} does not match {list(spec.shape)} (-1: any size; the first "
                "dimension counts the request's inputs)")
        if rows is not None and shape[0] != rows:
            raise InvalidArgument(f"input {name}",
                                  f"has {shape[0]} rows but the other inputs have {rows}; send one row per input")
        rows = shape[0]
    return rows or 0


def check_parameters(signature: V2Signature, params: dict[str, Any], task: str) -> None:
    if signature.parameters is None:
        return
    for key in params:
        if key not in signature.parameters:
            allowed = ", ".join(sorted(signature.parameters)) or "none"
            raise InvalidArgument(f"parameters.{key}", f"is not a parameter of {task}; allowed: {allowed}")


def grid(rows: Sequence[Sequence[Any]], value: Any, fill: Any, dtype: Any) -> np.ndarray:
    """[n, k] from n rows of up to k items (ragged rows padded with `fill`); `value` maps an item."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        for j, item in enumerate(row):
            out[i, j] = value(item)
    return out


def utf8(text: Any) -> bytes:
    return str(text).encode("utf-8")


def text_list(value: Any) -> Any:
    """A list parameter sent as one string: a JSON array ('["a", "b"]') or comma-separated ('a, b')."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("parameters", f"{value!r} starts like a JSON array but is not one: {exc}") from None
    return [part.strip() for part in value.split(",") if part.strip()]


def int_or(value: Any, fill: int) -> int:
    return fill if value is None else int(value)
