"""The asyncio twin of `pipeserve.client.pipeline`.

    from pipeserve.client import aio
    clf = aio.pipeline("sentiment-analysis", target="localhost:8001")
    await clf("I love this")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from pipeserve.client.channel import ConnectionOptions, ainvoke_stream, ainvoke_unary, default_target
from pipeserve.client.pipeline import connection_options, pipeline_arguments
from pipeserve.client.tasks import codec_for


class AsyncRemotePipeline:
    #: What pipeline(..., device=...) asked for (None: nothing); the server places the model itself.
    device: Any = None

    def __init__(self, task: str, model: str | None = None, options: ConnectionOptions | None = None,
                 channel: grpc.aio.Channel | None = None, **defaults: Any):
        self.task = task
        self.model = model
        self.options = options or ConnectionOptions(target=default_target())
        self.codec = codec_for(task)(model, task)
        self._own_channel = channel is None
        self.channel = channel or self.options.aio_channel()
        self.stub = self.codec.stub(self.channel)
        self._call = getattr(self.stub, self.codec.method)
        self.defaults = defaults

    async def __call__(self, *args: Any, timeout: float | None = None, **params: Any) -> Any:
        """Runs the task; `timeout` (seconds) bounds the whole call, retries included."""
        # Usually one positional argument, the inputs; the codec knows other call shapes.
        inputs, params = self.codec.call_arguments(args, self.codec.with_defaults(self.defaults, params))
        request = self.codec.build(inputs, params)
        response = await self._unary(self._call, request, timeout)
        return self.codec.shape(response, inputs, params)

    # For subclasses (streaming tasks): one call with this pipeline's deadline, metadata and retries.
    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        return await ainvoke_unary(self.options, method, request, timeout)

    def _stream(self, method: Any, request: Any, timeout: float | None) -> AsyncIterator[Any]:
        return ainvoke_stream(self.options, method, request, timeout)

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self) -> AsyncRemotePipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def pipeline(task: str, model: str | None = None, *, target: str | None = None, tls_ca: str | bool | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None,
             token: str | None = None, timeout: float | None = None, retries: int = 3, backoff: float = 0.1,
             wait_for_ready: bool = False, metadata: dict[str, str] | None = None, lb_policy: str | None = None,
             channel: grpc.aio.Channel | None = None, **defaults: Any) -> AsyncRemotePipeline:
    """Like `pipeserve.client.pipeline`, with coroutine calls. Create it inside the event loop."""
    options = connection_options(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                 tls_server_name=tls_server_name, token=token, timeout=timeout, retries=retries,
                                 backoff=backoff, wait_for_ready=wait_for_ready, metadata=metadata,
                                 lb_policy=lb_policy)
    defaults, placement = pipeline_arguments(task, model, defaults)
    cls = _specialised.get(codec_for(task).task, AsyncRemotePipeline)
    remote = cls(task, model, options, channel, **defaults)
    remote.device = placement.get("device")
    return remote


_specialised: dict[str, type[AsyncRemotePipeline]] = {}

from pipeserve.client.aio_streaming import AsyncTextGenerationPipeline  # noqa: E402 (it subclasses AsyncRemotePipeline)

_specialised["text-generation"] = AsyncTextGenerationPipeline
