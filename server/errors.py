"""The error hierarchy: raised where a problem is known, mapped to a gRPC status in one place.

Nothing below the adapters knows gRPC, so each error carries a plain code name
(`grpc.StatusCode` member name) that `adapters.status` turns into the real status.
"""

from __future__ import annotations

# The root and the backends' errors live with the backend contract, so that a backend needs no
# server code; they are the same classes here.
from pipeserve.backends.errors import BackendError, BackendUnavailable, InstanceDead, PipeserveError

__all__ = [
    "BackendError", "BackendUnavailable", "Cancelled", "ConfigError", "DeadlineExceeded", "InstanceDead",
    "InvalidArgument", "ModelControlDisabled", "ModelLoadFailed", "ModelNotFound", "ModelNotReady", "Overloaded", "PipeserveError",
    "ShuttingDown", "Unimplemented", "WrongTask",
]


class InvalidArgument(PipeserveError):
    """A request field is wrong; the message names the field and what is allowed."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why

    def for_input(self, index: int) -> InvalidArgument:
        """Re-labels an error a task raised about one batched input ("input...") with its index
        in the client's request ("inputs[3]..."), since batches mix inputs of many requests."""
        if self.field == "input" or self.field.startswith(("input.", "input[")):
            return InvalidArgument(f"inputs[{index}]{self.field[len('input'):]}", self.why)
        return self


class ModelNotFound(PipeserveError):
    code = "NOT_FOUND"


class WrongTask(PipeserveError):
    """The model exists but serves another task."""

    code = "FAILED_PRECONDITION"


class ModelNotReady(PipeserveError):
    """The repository holds the model but it cannot answer yet (loading, reloading, unloading, an
    instance being replaced): retrying will do."""

    code = "UNAVAILABLE"


class ModelLoadFailed(PipeserveError):
    """The model failed to load (the reason says why), or is held but not loaded: a retry will not
    help until its files are fixed or it is loaded."""

    code = "FAILED_PRECONDITION"


class ModelControlDisabled(PipeserveError):
    """Load and unload requests while the server runs with --model-control-mode none."""

    code = "FAILED_PRECONDITION"


class Overloaded(PipeserveError):
    """A queue is full; the client should back off and retry."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(PipeserveError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(PipeserveError):
    code = "CANCELLED"


class ShuttingDown(PipeserveError):
    code = "UNAVAILABLE"


class Unimplemented(PipeserveError):
    code = "UNIMPLEMENTED"


class ConfigError(PipeserveError):
    """A model's config.pbtxt is wrong: names the file, the field and what is allowed."""

    code = "INVALID_ARGUMENT"

    def __init__(self, path: object, field: str, why: str):
        super().__init__(f"{path}: {field}: {why}")
        self.path = path
        self.field = field
        # What the file names, where it could be read (for the model's status).
        self.task = ""
        self.backend = ""
