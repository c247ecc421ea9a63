"""`pipeline(task, target=...)`: transformers' pipeline, run by a pipeserve server.

    from pipeserve.client import pipeline
    clf = pipeline("sentiment-analysis", target="localhost:8001")
    clf("I love using transformers!")   # [{'label': 'POSITIVE', 'score': 0.99...}]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc

from pipeserve.client.channel import ConnectionOptions, default_target, invoke_stream, invoke_unary
from pipeserve.client.tasks import codec_for


log = logging.getLogger("pipeserve.client")


class RemotePipeline:
    """Calls one task on one (or the default) model. Returns what transformers' pipeline returns."""

    #: What pipeline(..., device=...) asked for (None: nothing); the server places the model itself.
    device: Any = None

    def __init__(self, task: str, model: str | None = None, options: ConnectionOptions | None = None,
                 channel: grpc.Channel | None = None, **defaults: Any):
        self.task = task
        self.model = model
        self.options = options or ConnectionOptions(target=default_target())
        self.codec = codec_for(task)(model, task)
        self._own_channel = channel is None
        self.channel = channel or self.options.sync_channel()
        self.stub = self.codec.stub(self.channel)
        self._call = getattr(self.stub, self.codec.method)
        self.defaults = defaults

    def __call__(self, *args: Any, timeout: float | None = None, **params: Any) -> Any:
        """Runs the task; `timeout` (seconds) bounds the whole call, retries included."""
        # Usually one positional argument, the inputs; the codec knows other call shapes.
        inputs, params = self.codec.call_arguments(args, self.codec.with_defaults(self.defaults, params))
        request = self.codec.build(inputs, params)
        response = self._unary(self._call, request, timeout)
        return self.codec.shape(response, inputs, params)

    # For subclasses (streaming tasks): one call with this pipeline's deadline, metadata and retries.
    def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        return invoke_unary(self.options, method, request, timeout)

    def _stream(self, method: Any, request: Any, timeout: float | None) -> Iterator[Any]:
        return invoke_stream(self.options, method, request, timeout)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> RemotePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connection_options(target: str | None = None, *, tls_ca: str | bool | None = None, tls_cert: str | None = None,
                       tls_key: str | None = None, tls_server_name: str | None = None, token: str | None = None,
                       timeout: float | None = None, retries: int = 3, backoff: float = 0.1,
                       wait_for_ready: bool = False, metadata: dict[str, str] | None = None,
                       lb_policy: str | None = None) -> ConnectionOptions:
    """ConnectionOptions from pipeline()'s keyword arguments (target None: $PIPESERVE_TARGET or localhost:8001)."""
    return ConnectionOptions(target=target or default_target(), tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                             tls_server_name=tls_server_name, token=token, timeout=timeout, retries=retries,
                             backoff=backoff, wait_for_ready=wait_for_ready, lb_policy=lb_policy,
                             metadata=tuple((k.lower(), v) for k, v in (metadata or {}).items()))


# transformers' pipeline() arguments that choose where and how the model runs. A pipeserve server
# decides that itself (config.pbtxt: instance_group, backend), so a remote pipeline takes them and
# changes nothing: results are the same on any device.
PLACEMENT_ARGUMENTS = {
    "device": "the server places the model (config.pbtxt instance_group: CPU or GPU instances)",
    "device_map": "the server places the model (config.pbtxt instance_group)",
    "dtype": "the server loads the model in its configured precision",
    "torch_dtype": "the server loads the model in its configured precision",
    "framework": "the server runs PyTorch",
    "batch_size": "the server batches requests itself (dynamic batching)",
    "num_workers": "the server runs the work; there is no local data loader",
    "binary_output": "results come back as Python values",
}
# Arguments that give the pipeline parts of a model: the server loads them from the model's folder,
# so one that names the model itself is taken (it is what the server loads) and any other refused.
MODEL_PARTS = ("config", "tokenizer", "feature_extractor", "image_processor", "video_processor", "processor")
REFUSED_ARGUMENTS = {
    "revision": "the server serves the versions in its repository; pick one with the model name",
    "use_fast": "the server loads the model's tokenizer as its folder defines it",
    "trust_remote_code": "the model's config.pbtxt decides (trust_remote_code)",
    "model_kwargs": "the server loads the model; its config.pbtxt holds what loading takes",
    "pipeline_class": "the server runs its own task classes (a task plugin customises one)",
}


def pipeline_arguments(task: str, model: Any, arguments: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """transformers' pipeline() keyword arguments split into (default call parameters, placement
    arguments taken and ignored); TypeError for those a remote pipeline cannot honour."""
    defaults, placement = {}, {}
    for name, value in arguments.items():
        if name in PLACEMENT_ARGUMENTS:
            placement[name] = value
        elif name in MODEL_PARTS:
            if value is not None and value != model:
                raise TypeError(f"{task}: {name}={value!r} is not served: the server loads the model's own "
                                f"{name.replace('_', ' ')} from its repository (name the model, not its parts)")
        elif name in REFUSED_ARGUMENTS:
            raise TypeError(f"{task}: {name} is not served: {REFUSED_ARGUMENTS[name]}")
        else:
            defaults[name] = value
    device = placement.get("device")
    if not (device is None or isinstance(device, (int, str)) or hasattr(device, "type")):
        raise TypeError(f"device must be an int, a string or a torch.device, got {type(device).__name__}")
    if placement:
        log.info("%s pipeline: %s ignored: %s", task, ", ".join(f"{k}={v!r}" for k, v in placement.items()),
                 "; ".join(PLACEMENT_ARGUMENTS[k] for k in placement))
    return defaults, placement


def pipeline(task: str, model: str | None = None, *, target: str | None = None, tls_ca: str | bool | None = None,
             tls_cert: str | None = None, tls_key: str | None = None, tls_server_name: str | None = None,
             token: str | None = None, timeout: float | None = None, retries: int = 3, backoff: float = 0.1,
             wait_for_ready: bool = False, metadata: dict[str, str] | None = None, lb_policy: str | None = None,
             channel: grpc.Channel | None = None, **defaults: Any) -> RemotePipeline:
    """A remote pipeline for `task` (aliases such as "sentiment-analysis" and "ner" work too).

    `model` names a model of the server; None uses the server's default model for the task.
    `target` is "host:port" or "unix:/path/to.sock"; None reads $PIPESERVE_TARGET, else
    localhost:8001. TLS: `tls_ca` (a PEM path, or True for the system roots); mTLS adds
    `tls_cert` and `tls_key`. `token` is sent as `authorization: Bearer <token>`, `metadata` on
    every call. `timeout` (seconds) bounds each call, its `retries` on UNAVAILABLE included.
    `wait_for_ready` waits for a server that is not up yet; `lb_policy="round_robin"` spreads
    calls over every address of a "dns:///name:port" target. Keyword arguments that are not connection settings become default call parameters, as with
    transformers' pipeline().

    transformers' placement arguments (`device`, `device_map`, `dtype`, `batch_size`, ...) are
    taken and change nothing: the server runs the model where its config.pbtxt says, and results
    do not depend on it. `device` is kept as the pipeline's `device` attribute.
    """
    options = connection_options(target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                 tls_server_name=tls_server_name, token=token, timeout=timeout, retries=retries,
                                 backoff=backoff, wait_for_ready=wait_for_ready, metadata=metadata,
                                 lb_policy=lb_policy)
    defaults, placement = pipeline_arguments(task, model, defaults)
    cls = _specialised.get(codec_for(task).task, RemotePipeline)
    remote = cls(task, model, options, channel, **defaults)
    remote.device = placement.get("device")
    return remote


# Tasks with methods beyond __call__ (streaming generation) register a subclass here.
_specialised: dict[str, type[RemotePipeline]] = {}

from pipeserve.client.streaming import TextGenerationPipeline  # noqa: E402 (it subclasses RemotePipeline)

_specialised["text-generation"] = TextGenerationPipeline
