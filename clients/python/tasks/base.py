"""How the SDK speaks one task: build the request, name the RPC, shape the response like transformers."""

from __future__ import annotations

from typing import Any, ClassVar


class TaskCodec:
    """One per task. Stateless: the sync and asyncio pipelines share it."""

    #: Canonical task name and aliases, as transformers spells them.
    task: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    #: The generated stub class and the RPC method name on it.
    stub: ClassVar[Any] = None
    method: ClassVar[str] = ""

    def __init__(self, model: str | None, task_name: str):
        self.model = model or ""
        self.task_name = task_name

    def with_defaults(self, defaults: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """A call's parameters over the pipeline's (pipeline(task, **defaults)). A task whose
        result's shape depends on where a parameter was given (text-classification's top_k)
        overrides this to note it."""
        return {**defaults, **params}

    def call_arguments(self, args: tuple[Any, ...], params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(inputs, params) from a call's arguments. Most tasks take the inputs as the one positional
        argument; tasks with other call shapes (question=..., context=...) override this."""
        if not args and "inputs" in params:
            params = dict(params)
            return params.pop("inputs"), params
        if len(args) != 1:
            raise TypeError(f"a {self.task} pipeline takes the inputs as its one positional argument, got {len(args)}")
        return args[0], params

    def build(self, inputs: Any, params: dict[str, Any]) -> Any:
        raise NotImplementedError

    def shape(self, response: Any, inputs: Any, params: dict[str, Any]) -> Any:
        raise NotImplementedError


def as_list(inputs: Any) -> tuple[list[Any], bool]:
    """(inputs as a list, whether the caller passed a single input)."""
    if isinstance(inputs, (list, tuple)):
        return list(inputs), False
    return [inputs], True
