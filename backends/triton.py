"""The Triton backend: a batch's tensors go to a model on a Triton Inference Server over gRPC.

Triton (or anything speaking the KServe v2 gRPC protocol) runs the model, for example a TensorRT
plan that `pipeserve export --backend tensorrt` prepared; pipeserve keeps the task's pre- and
post-processing, batching and its API. Configured by `backend_parameters` in config.pbtxt:

    url              Triton's gRPC address, host:port (required)
    model_name       the remote model (default: this model's name)
    model_version    the remote version (default: "", Triton's choice)
    inputs           local[=remote][:DATATYPE], comma-separated: the tensors sent (default: the
                     task's input names as INT64). Inputs of the batch not listed are not sent.
    outputs          local[=remote][:DATATYPE]: the tensors asked for (default: the task's output
                     names as FP32); DATATYPE is checked against the remote model's metadata
    timeout_s        deadline of one remote call, seconds (default 30)
    retries          extra attempts after UNAVAILABLE, with doubling backoff (default 3)
    retry_backoff_s  the first backoff, seconds (default 0.05; at most 1 s)
    ready_cache_s    how often readiness is polled (default 1.0)

The instance calls Triton with the synchronous client from its own worker thread (where
`Instance.run` runs): no event loop to share, and one gRPC channel per Triton address shared by
every instance and model that calls it. `ready()` follows the remote model (`is_model_ready`,
polled in the background so that the scheduler's check never waits on the network); while it is
False the scheduler refuses the model's requests with UNAVAILABLE. A call that still finds
Triton UNAVAILABLE after its retries fails its batch only, with BackendUnavailable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeserve.backends.base import Backend, Instance, ModelSpec
from pipeserve.backends.errors import BackendError, BackendUnavailable

log = logging.getLogger("pipeserve.backends.triton")

# KServe v2 datatypes that travel as numpy arrays (BF16 and BYTES do not fit a tensor backend).
DATATYPES: dict[str, Any] = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
PARAMETERS = ("url", "model_name", "model_version", "inputs", "outputs", "timeout_s", "retries",
              "retry_backoff_s", "ready_cache_s")
_MAX_BACKOFF_S = 1.0
# gRPC's reconnect backoff grows to 120 s by default: after a long outage the channel would wait
# that long before it tries again. Capped at 1 s, a Triton that comes back is seen within a poll.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]
# Status codes worth another attempt: the server is (re)starting or the connection dropped.
_RETRYABLE = ("UNAVAILABLE",)


@dataclass(frozen=True)
class TensorBinding:
    """One tensor: its name in pipeserve's batch, its name and datatype on Triton."""

    local: str
    remote: str
    datatype: str


def parse_bindings(text: str, default_names: tuple[str, ...], default_datatype: str, key: str) -> tuple[TensorBinding, ...]:
    """`local[=remote][:DATATYPE], ...` (or the defaults) as bindings; errors name the key."""
    if not text.strip():
        return tuple(TensorBinding(n, n, default_datatype) for n in default_names)
    bindings = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        names, _, datatype = part.partition(":")
        local, _, remote = names.partition("=")
        local, remote, datatype = local.strip(), (remote or local).strip(), (datatype or default_datatype).strip().upper()
        if not local or not remote:
            raise ValueError(f"backend_parameters.{key}: {part!r} must be local[=remote][:DATATYPE]")
        if datatype not in DATATYPES:
            raise ValueError(f"backend_parameters.{key}: datatype {datatype!r} of {local!r} is not one of "
                             f"{', '.join(DATATYPES)}")
        bindings.append(TensorBinding(local, remote, datatype))
    if len({b.local for b in bindings}) != len(bindings):
        raise ValueError(f"backend_parameters.{key}: a tensor is listed twice in {text!r}")
    return tuple(bindings)


def _number(parameters: Mapping[str, str], key: str, default: float, low: float) -> float:
    raw = parameters.get(key, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"backend_parameters.{key}: {raw!r} is not a number") from None
    if not value >= low:
        raise ValueError(f"backend_parameters.{key}: must be >= {low}, got {raw!r}")
    return value


@dataclass(frozen=True)
class TritonSettings:
    """backend_parameters, parsed and checked once."""

    url: str
    model_name: str
    model_version: str
    inputs: tuple[TensorBinding, ...]
    outputs: tuple[TensorBinding, ...]
    timeout_s: float = 30.0
    retries: int = 3
    retry_backoff_s: float = 0.05
    ready_cache_s: float = 1.0

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> TritonSettings:
        p = spec.parameters
        unknown = sorted(set(p) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"backend_parameters: {unknown} unknown to backend triton; allowed: {', '.join(PARAMETERS)}")
        url = p.get("url", "").strip()
        if not url or "://" in url or ":" not in url:
            raise ValueError(f"backend_parameters.url: Triton's gRPC address as host:port is required, got {url!r}")
        version = p.get("model_version", "").strip()
        if version and not version.isdigit():
            raise ValueError(f"backend_parameters.model_version: must be a version number, got {version!r}")
        inputs = parse_bindings(p.get("inputs", ""), spec.input_names, "INT64", "inputs")
        outputs = parse_bindings(p.get("outputs", ""), spec.output_names, "FP32", "outputs")
        if not inputs or not outputs:
            raise ValueError("backend_parameters.inputs and outputs: the task declares none; list them")
        missing = [n for n in spec.output_names if n not in {b.local for b in outputs}]
        if missing:
            raise ValueError(f"backend_parameters.outputs: the task reads {missing}; add them")
        return cls(
            url=url, model_name=p.get("model_name", "").strip() or spec.name, model_version=version,
            inputs=inputs, outputs=outputs, timeout_s=_number(p, "timeout_s", 30.0, 0.001),
            retries=int(_number(p, "retries", 3, 0)), retry_backoff_s=_number(p, "retry_backoff_s", 0.05, 0),
            ready_cache_s=_number(p, "ready_cache_s", 1.0, 0.01),
        )

    @property
    def remote_label(self) -> str:
        version = f" version {self.model_version}" if self.model_version else ""
        return f"Triton model {self.model_name!r}{version} at {self.url}"


class _ClientPool:
    """One gRPC channel (a tritonclient InferenceServerClient) per Triton address, shared and
    reference-counted: instances and models calling one Triton multiplex one HTTP/2 connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, list[Any]] = {}

    def acquire(self, url: str) -> Any:
        import tritonclient.grpc as grpcclient

        with self._lock:
            entry = self._clients.get(url)
            if entry is None:
                # The channel connects lazily: a Triton that is down now does not fail the load.
                entry = self._clients[url] = [grpcclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS), 0]
            entry[1] += 1
            return entry[0]

    def release(self, url: str) -> None:
        with self._lock:
            entry = self._clients.get(url)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._clients[url]
                entry[0].close()

    def size(self) -> int:
        with self._lock:
            return len(self._clients)


CLIENTS = _ClientPool()


def _status(exc: Exception) -> str:
    """"UNAVAILABLE" from a tritonclient error (whose status() reads "StatusCode.UNAVAILABLE")."""
    status = getattr(exc, "status", None)
    text = status() if callable(status) else ""
    return str(text or "").rsplit(".", 1)[-1]


def _message(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return str(text or exc).strip()


class TritonInstance(Instance):
    def __init__(self, settings: TritonSettings, client: Any, max_batch_size: int):
        self.settings = settings
        self.client = client
        self.device = torch.device("cpu")
        # The remote model's largest batch (larger ones are split; 0: no limit known; -1: not
        # asked yet because Triton was down at load).
        self.max_batch_size = max_batch_size
        self._ready = False
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    # -- readiness ------------------------------------------------------------------------------

    def start_polling(self) -> None:
        self._ready = self._check_ready()
        self._poller = threading.Thread(target=self._poll, name=f"triton-ready:{self.settings.model_name}", daemon=True)
        self._poller.start()

    def _check_ready(self) -> bool:
        s = self.settings
        try:
            return bool(self.client.is_model_ready(s.model_name, s.model_version,
                                                   client_timeout=min(s.timeout_s, max(1.0, s.ready_cache_s))))
        except Exception as exc:  # down, unreachable, or timed out: all mean "not ready"
            log.debug("%s not ready: %s: %s", s.remote_label, _status(exc), _message(exc))
            return False

    def _poll(self) -> None:
        while not self._closed.wait(self.settings.ready_cache_s):
            ready = self._check_ready()
            if ready and self.max_batch_size < 0:
                # Triton was down when the model loaded: learn the remote batch size now.
                self.max_batch_size = TritonBackend.remote_max_batch_size(self.settings, self.client)
            if ready != self._ready:
                log.info("%s is %s", self.settings.remote_label, "ready" if ready else "not ready")
            self._ready = ready

    def ready(self) -> bool:
        """The remote model's readiness as last seen (at most ready_cache_s old); never blocks."""
        return self._ready and not self._closed.is_set()

    # -- running ----------------------------------------------------------------------------------

    def run(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [b.local for b in self.settings.inputs if b.local not in inputs]
        if missing:
            raise ValueError(f"backend_parameters.inputs lists {missing}, which the task did not send; it sent "
                             f"{sorted(inputs)}")
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        step = self.max_batch_size if self.max_batch_size > 0 else max(rows, 1)
        if rows <= step:
            return self._infer(inputs)
        parts = [self._infer({k: v[begin:begin + step] for k, v in inputs.items()}) for begin in range(0, rows, step)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _infer(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import tritonclient.grpc as grpcclient

        s = self.settings
        request = []
        for b in s.inputs:
            array = np.ascontiguousarray(inputs[b.local].detach().cpu().numpy(), dtype=DATATYPES[b.datatype])
            tensor = grpcclient.InferInput(b.remote, list(array.shape), b.datatype)
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        wanted = [grpcclient.InferRequestedOutput(b.remote) for b in s.outputs]
        result = self._call_with_retries(request, wanted)
        outputs = {}
        for b in s.outputs:
            array = result.as_numpy(b.remote)
            if array is None:
                raise BackendError(f"{s.remote_label} returned no output {b.remote!r}")
            tensor = torch.from_numpy(np.array(array))  # a copy: the response buffer is read-only
            outputs[b.local] = tensor.float() if tensor.is_floating_point() else tensor
        return outputs

    def _call_with_retries(self, request: list[Any], wanted: list[Any]) -> Any:
        s = self.settings
        backoff = s.retry_backoff_s
        for attempt in range(s.retries + 1):
            try:
                result = self.client.infer(s.model_name, request, model_version=s.model_version, outputs=wanted,
                                           client_timeout=s.timeout_s)
                self._ready = True
                return result
            except Exception as exc:
                status, message = _status(exc), _message(exc)
                if status in _RETRYABLE and attempt < s.retries and not self._closed.is_set():
                    time.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
                    continue
                if status in _RETRYABLE:
                    self._ready = False  # fail the queue fast until the poller sees it back
                    raise BackendUnavailable(f"{s.remote_label} is unavailable after {attempt + 1} attempt(s): "
                                             f"{message}") from None
                if status == "DEADLINE_EXCEEDED":
                    raise BackendUnavailable(f"{s.remote_label} did not answer within timeout_s={s.timeout_s:g}") from None
                raise BackendError(f"{s.remote_label} failed: {status or type(exc).__name__}: {message}") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
        CLIENTS.release(self.settings.url)


class TritonBackend(Backend):
    """Calls a model on a Triton Inference Server; instances are local threads, the model is remote."""

    name = "triton"

    def devices(self, requested: list[torch.device]) -> list[torch.device]:
        # The remote server places the model; each instance here is a concurrent caller.
        return [torch.device("cpu")] * max(1, len(requested))

    def load(self, spec: ModelSpec, device: torch.device) -> Instance:
        settings = TritonSettings.from_spec(spec)
        client = CLIENTS.acquire(settings.url)
        try:
            max_batch_size = self._check_remote(settings, client)
            instance = TritonInstance(settings, client, max_batch_size)
            instance.start_polling()
        except BaseException:
            CLIENTS.release(settings.url)
            raise
        return instance

    @staticmethod
    def _check_remote(settings: TritonSettings, client: Any) -> int:
        """Checks names and datatypes against the remote model's metadata when Triton answers and
        returns its max_batch_size; -1 when Triton is down (not an error: readiness follows it)."""
        timeout = min(settings.timeout_s, 5.0)
        try:
            metadata = client.get_model_metadata(settings.model_name, settings.model_version, client_timeout=timeout)
        except Exception as exc:
            log.warning("%s cannot be checked now (%s: %s); it serves once Triton has it ready",
                        settings.remote_label, _status(exc) or type(exc).__name__, _message(exc))
            return -1
        for kind, bindings, declared in (("inputs", settings.inputs, metadata.inputs),
                                         ("outputs", settings.outputs, metadata.outputs)):
            remote = {t.name: t.datatype for t in declared}
            for b in bindings:
                if b.remote not in remote:
                    raise ValueError(f"backend_parameters.{kind}: {settings.remote_label} has no {kind[:-1]} "
                                     f"{b.remote!r}; it has {sorted(remote)}")
                if remote[b.remote] != b.datatype:
                    raise ValueError(f"backend_parameters.{kind}: {b.remote!r} is {remote[b.remote]} on Triton, "
                                     f"not {b.datatype}; write {b.local}={b.remote}:{remote[b.remote]}")
        return max(0, TritonBackend.remote_max_batch_size(settings, client))

    @staticmethod
    def remote_max_batch_size(settings: TritonSettings, client: Any) -> int:
        try:
            config = client.get_model_config(settings.model_name, settings.model_version,
                                             client_timeout=min(settings.timeout_s, 5.0))
        except Exception:
            return -1
        return int(config.config.max_batch_size)
