"""The asyncio twin of `pipeserve.client.pipeline`.

    from pipeserve.client import aio
    clf = aio.pipeline("sentiment-analysis", target="localhost:8001")
    await clf("I love this")
"""

from __future__ import annotations

from typing import Any

import grpc

from pipeserve.client.channel import ConnectionOptions, acall_with_retries, call_kwargs
from pipeserve.client.tasks import codec_for


class AsyncRemotePipeline:
    def __init__(self, task: str, model: str | None = None, options: ConnectionOptions | None = None,
                 channel: grpc.aio.Channel | None = None, **defaults: Any):
        self.task = task
        self.model = model
        self.options = options or ConnectionOptions()
        self.codec = codec_for(task)(model, task)
        self._own_channel = channel is None
        self.channel = channel or self.options.aio_channel()
        self._call = getattr(self.codec.stub(self.channel), self.codec.method)
        self.defaults = defaults

    async def __call__(self, inputs: Any, *, timeout: float | None = None, **params: Any) -> Any:
        params = {**self.defaults, **params}
        request = self.codec.build(inputs, params)
        kwargs = call_kwargs(self.options, timeout)
        response = await acall_with_retries(self.options, lambda: self._call(request, **kwargs))
        return self.codec.shape(response, inputs, params)

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self) -> AsyncRemotePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def pipeline(task: str, model: str | None = None, *, target: str = "localhost:8001", tls_ca: str | bool | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, token: str | None = None,
             timeout: float | None = None, retries: int = 3, metadata: dict[str, str] | None = None,
             channel: grpc.aio.Channel | None = None, **defaults: Any) -> AsyncRemotePipeline:
    """Like `pipeserve.client.pipeline`, with coroutine calls. Create it inside the event loop."""
    options = ConnectionOptions(target=target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                                timeout=timeout, retries=retries, metadata=tuple((metadata or {}).items()))
    cls = _specialised.get(codec_for(task).task, AsyncRemotePipeline)
    return cls(task, model, options, channel, **defaults)


_specialised: dict[str, type[AsyncRemotePipeline]] = {}
