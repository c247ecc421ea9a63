"""What every typed task service (pipeserve.v1.<Task>Service) shares: the data plane, the call that
runs a request's inputs on the model it names, and wire enums read as task parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from pipeserve.server.adapters.status import timeout_of
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument

T = TypeVar("T")


class TaskServicer:
    """Base of the typed task servicers: a subclass names its `task` and mixes in the generated
    servicer whose RPCs it implements."""

    task: ClassVar[str] = ""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    async def infer(self, request: Any, inputs: Sequence[Any], params: dict[str, Any],
                    context: Any) -> tuple[list[Any], dict[str, Any]]:
        """Runs the inputs on the model the request names (its `model` and `model_version`; none:
        the task's default) within the call's deadline: (one result per input, the response's
        `model` and `model_version` fields)."""
        served, results = await self.plane.infer(self.task, inputs, params, model=request.model,
                                                 version=request.model_version, timeout=timeout_of(context))
        return results, {"model": served.name, "model_version": served.version}


_TRUNCATIONS: dict[int, Any] = {0: None, 1: "longest_first", 2: "only_first", 3: "only_second", 4: "do_not_truncate"}


def tokenizer_parameters(options: Any) -> dict[str, Any]:
    """A TokenizerOptions message (pipeserve.v1.tokenization) as the task parameters it stands for:
    transformers' truncation, max_length and add_special_tokens, the unset ones left out."""
    params: dict[str, Any] = {}
    truncation = enum_option("tokenizer.truncation", _TRUNCATIONS, options.truncation)
    if truncation is not None:
        params["truncation"] = truncation
    if options.HasField("max_length"):
        params["max_length"] = options.max_length
    if options.HasField("add_special_tokens"):
        params["add_special_tokens"] = options.add_special_tokens
    return params


def enum_option(field: str, options: Mapping[int, T], value: int) -> T:
    """A wire enum's number as the task parameter it stands for; an unknown one is INVALID_ARGUMENT."""
    if value not in options:
        raise InvalidArgument(field, f"unknown value {value}")
    return options[value]
