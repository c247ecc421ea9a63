"""`pipeline(task, target=...)`: transformers' pipeline, run by a pipeserve server.

    from pipeserve.client import pipeline
    clf = pipeline("sentiment-analysis", target="localhost:8001")
    clf("I love using transformers!")   # [{'label': 'POSITIVE', 'score': 0.51...}]
"""

from __future__ import annotations

from typing import Any

import grpc

from pipeserve.client.channel import ConnectionOptions, call_kwargs, call_with_retries
from pipeserve.client.tasks import codec_for


class RemotePipeline:
    """Calls one task on one (or the default) model. Returns what transformers' pipeline returns."""

    def __init__(self, task: str, model: str | None = None, options: ConnectionOptions | None = None,
                 channel: grpc.Channel | None = None, **defaults: Any):
        self.task = task
        self.model = model
        self.options = options or ConnectionOptions()
        self.codec = codec_for(task)(model, task)
        self._own_channel = channel is None
        self.channel = channel or self.options.sync_channel()
        self._call = getattr(self.codec.stub(self.channel), self.codec.method)
        self.defaults = defaults

    def __call__(self, inputs: Any, *, timeout: float | None = None, **params: Any) -> Any:
        params = {**self.defaults, **params}
        request = self.codec.build(inputs, params)
        kwargs = call_kwargs(self.options, timeout)
        response = call_with_retries(self.options, lambda: self._call(request, **kwargs))
        return self.codec.shape(response, inputs, params)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pipeline(task: str, model: str | None = None, *, target: str = "localhost:8001", tls_ca: str | bool | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None,
             timeout: float | None = None, retries: int = 3, metadata: dict[str, str] | None = None,
             channel: grpc.Channel | None = None, **defaults: Any) -> RemotePipeline:
    """A remote pipeline for `task` (aliases such as "sentiment-analysis" and "ner" work too).

    `model` names a model of the server; None uses the server's default model for the task.
    `target` is "host:port" or "unix:/path/to.sock". Keyword arguments that are not connection
    settings become default call parameters, as with transformers' pipeline().
    """
    options = ConnectionOptions(target=target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                                timeout=timeout, retries=retries, metadata=tuple((metadata or {}).items()))
    cls = _specialised.get(codec_for(task).task, RemotePipeline)
    return cls(task, model, options, channel, **defaults)


# Tasks with methods beyond __call__ (streaming generation) register a subclass here.
_specialised: dict[str, type[RemotePipeline]] = {}
