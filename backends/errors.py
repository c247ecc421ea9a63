"""The errors a backend raises, importable without the server (a third-party backend needs only
`pipeserve.backends`).

`PipeserveError` is the root of every error a client may see; its `code` names a grpc.StatusCode
member, which the server's adapters turn into the real status. The server adds its own errors
(bad arguments, unknown models, full queues) under the same root in `pipeserve.server.errors`.
"""

from __future__ import annotations


class PipeserveError(Exception):
    """Base of every error a client may see. `code` names a grpc.StatusCode member."""

    code = "INTERNAL"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BackendError(PipeserveError):
    """A backend failed while running a batch; only that batch's requests see it."""

    code = "INTERNAL"


class BackendUnavailable(PipeserveError):
    """A backend cannot run work now (a remote server is down); retrying later may work."""

    code = "UNAVAILABLE"


class InstanceDead(Exception):
    """Raised by `Instance.run` (or `generate`) when the instance can no longer run anything: its
    worker process died, its remote session is gone for good, its device context is poisoned.

    The server fails the batch that was running with UNAVAILABLE, closes the instance and loads a
    new one in its place on the same device (`Backend.load` again). An ordinary exception fails
    only its batch (INTERNAL) and the instance keeps serving; a transient outage is `ready()`
    returning False, which holds work back without a restart.
    """
