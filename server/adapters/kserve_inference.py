"""The protocol-neutral half of KServe v2: a request as named tensors and parameters, run through
the model's codec and the DataPlane, answered as named numpy arrays.

Both v2 adapters use it: gRPC (`kserve.py`, tritonclient's protobuf messages) and REST
(`http/kserve.py`, JSON and Triton's binary tensors); each only turns its wire format into a
`V2Request` and a `V2Response` back into its wire format.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any

import numpy as np

from pipeserve.server.adapters.kserve_codecs import CodecCache
from pipeserve.server.adapters.kserve_signature import TaskCodec, TensorSpec, V2Signature, check_parameters, check_tensors
from pipeserve.server.control_plane import ControlPlane, ModelDescription, VersionState
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument

SERVER_NAME = "pipeserve"
EXTENSIONS = ["model_configuration", "model_repository", "statistics", "parameters"]
# Request parameters the protocol reserves (tritonclient sets them from its own arguments).
_SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")
_IGNORED_PARAMS = ("headers", "binary_data_output")
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"


def server_version() -> str:
    try:
        return package_version("pipeserve")
    except PackageNotFoundError:
        return "0"


def parse_version(text: str) -> int:
    """A v2 model_version string: "" (the newest) or a positive number."""
    if not text:
        return 0
    if not text.isdigit() or int(text) <= 0:
        raise InvalidArgument("model_version",
                              f"must be a positive number such as '1', or empty for the newest; got {text!r}")
    return int(text)


def platform(model: ModelDescription) -> str:
    return f"pipeserve:{model.task_name}"


@dataclass(frozen=True)
class InputTensor:
    """A request tensor as its wire declared it; `decode` reads its values (checked against the
    shape), called only once the name, datatype and shape matched the model's signature."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    decode: Callable[[], np.ndarray]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class V2Request:
    model_name: str
    model_version: str
    inputs: Sequence[InputTensor]
    # Request parameters, as Python values.
    parameters: Mapping[str, Any]
    outputs: Sequence[RequestedOutput] = ()
    id: str = ""


@dataclass(frozen=True)
class V2Response:
    model_name: str
    model_version: str
    id: str
    # The outputs asked for (all, when none were named), in signature order.
    outputs: tuple[tuple[TensorSpec, np.ndarray], ...]
    # triton_final_response, for clients that asked for an empty final response; None otherwise.
    final: bool | None = None


class V2Inference:
    """Runs v2 requests: the model's codec decodes tensors into the task's inputs, the DataPlane
    runs them (`stream` for a decoupled model on a stream), the codec encodes the results."""

    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane
        self.control = control
        self.codecs = CodecCache()

    def model(self, name: str, version: str) -> tuple[ModelDescription, TaskCodec]:
        """A loaded version (version "": the newest) and its codec."""
        model = self.control.describe(name, parse_version(version))
        return model, self.codecs.get(model)

    async def responses(self, request: V2Request, deadline_s: float | None,
                        streaming: bool = False) -> AsyncIterator[V2Response]:
        """The responses to one request: one, or on a stream to a decoupled model (generation), one
        per batch of new tokens."""
        model, codec = self.model(request.model_name, request.model_version)
        signature = codec.signature
        params, priority, timeout, empty_final = split_parameters(request.parameters, deadline_s)
        # "stream" chooses between one response and many; only a stream can carry many.
        stream = bool(params.pop("stream", True)) and streaming if signature.decoupled else False
        requested = requested_outputs(request.outputs, signature)
        check_tensors(signature, [(t.name, t.datatype, list(t.shape)) for t in request.inputs])
        tensors = {t.name: t.decode() for t in request.inputs}
        check_parameters(signature, params, model.task_name)
        inputs, task_params = codec.decode(tensors, params, requested)
        version = parse_version(request.model_version)
        if stream:
            if len(inputs) != 1:
                raise InvalidArgument(f"input {signature.inputs[0].name}", f"holds {len(inputs)} inputs; a streamed "
                                      "request takes one (send one request per input on the stream)")
            answered, events = self.plane.stream(model.task_name, inputs[0], task_params, model=model.name,
                                                 version=version, timeout=timeout)
            # aclosing: however the stream ends (the client gone too), the sequence stops now.
            async with contextlib.aclosing(events):
                async for event in events:
                    yield _response(request, answered.name, answered.version, signature, codec.encode_event(event),
                                    requested, final=False if empty_final else None)
            if empty_final:
                yield _response(request, answered.name, answered.version, signature, {}, requested, final=True)
            return
        answered, results = await self.plane.infer(
            model.task_name, inputs, task_params, model=model.name, version=version, timeout=timeout,
            priority=priority,
        )
        yield _response(request, answered.name, answered.version, signature, codec.encode(results, task_params),
                        requested, final=True if empty_final else None)


def _response(request: V2Request, name: str, version: int, signature: V2Signature, arrays: dict[str, Any],
              requested: set[str], final: bool | None) -> V2Response:
    outputs = tuple((spec, arrays[spec.name]) for spec in signature.outputs
                    if spec.name in arrays and (not requested or spec.name in requested))
    return V2Response(name, str(version), request.id, outputs, final)


def split_parameters(parameters: Mapping[str, Any],
                     deadline_s: float | None) -> tuple[dict[str, Any], int, float | None, bool]:
    """(task parameters, priority, timeout in seconds, empty-final-response flag)."""
    params = dict(parameters)
    if params.pop("sequence_id", 0):
        raise InvalidArgument("parameters.sequence_id", "sequence batching is not supported; send independent requests")
    for key in (*_SEQUENCE_PARAMS, *_IGNORED_PARAMS):
        params.pop(key, None)
    priority = params.pop("priority", 0) or 0
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise InvalidArgument("parameters.priority", f"must be a non-negative integer, got {priority!r}")
    timeout = deadline_s
    timeout_us = params.pop("timeout", None)
    if timeout_us is not None:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < 0:
            raise InvalidArgument("parameters.timeout",
                                  f"must be microseconds (a non-negative integer), got {timeout_us!r}")
        if timeout_us:
            timeout = min(timeout, timeout_us / 1e6) if timeout is not None else timeout_us / 1e6
    empty_final = bool(params.pop(EMPTY_FINAL_RESPONSE, False))
    # Other triton_* parameters steer Triton features pipeserve does not have; they change nothing here.
    params = {k: v for k, v in params.items() if not k.startswith("triton_")}
    return params, int(priority), timeout, empty_final


def requested_outputs(outputs: Sequence[RequestedOutput], signature: V2Signature) -> set[str]:
    requested = set()
    for output in outputs:
        if signature.output(output.name) is None:
            names = ", ".join(s.name for s in signature.outputs)
            raise InvalidArgument(f"output {output.name}", f"is not an output of this model; its outputs: {names}")
        if "classification" in output.parameters:
            raise InvalidArgument(f"output {output.name}", "the classification extension is not supported; "
                                  "classification models return LABEL and SCORE, with the top_k parameter")
        requested.add(output.name)
    return requested


@dataclass(frozen=True)
class IndexEntry:
    """A line of the repository index, as v2 reports it (a model never loaded: UNAVAILABLE, no version)."""

    name: str
    version: str
    state: str
    reason: str


def repository_index(control: ControlPlane, repository: str = "", ready: bool = False) -> list[IndexEntry]:
    control.check_repository(repository)
    index = []
    for name, versions in control.index():
        if not versions:
            if not ready:
                index.append(IndexEntry(name, "", "UNAVAILABLE", "not loaded"))
            continue
        for status in versions:
            entry = _index_entry(status)
            if ready and entry.state != "READY":
                continue
            index.append(entry)
    return index


def _index_entry(status: VersionState) -> IndexEntry:
    state = "UNAVAILABLE" if status.state == "FAILED" else status.state
    return IndexEntry(status.name, str(status.version) if status.version else "", state, status.reason)
