"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2), as Triton speaks it.

Every loaded model is a v2 model whose tensors come from its task's codec (kserve_codecs.py);
inference goes through `DataPlane.infer` like every other adapter. The service definition is the
one tritonclient ships (`tritonclient.grpc.service_pb2`), so Triton's clients work unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from pipeserve.server.adapters.kserve_codecs import V2Signature, check_parameters, check_tensors, codec_for
from pipeserve.server.adapters.kserve_tensors import decode_tensor, encode_tensor, infer_parameter, parameter_value
from pipeserve.server.adapters.status import stream_rpc, timeout_of, unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, ModelNotFound, PipeserveError, Unimplemented
from pipeserve.server.served_model import ServedModel
from pipeserve.v1.model_config_pb2 import InstanceGroup, ModelConfig

log = logging.getLogger("pipeserve.kserve")

SERVER_NAME = "pipeserve"
EXTENSIONS = ["model_configuration", "model_repository", "statistics", "parameters"]
# Requests one stream may have in flight before the server stops reading it (back-pressure).
MAX_STREAM_IN_FLIGHT = 256
# Request parameters the protocol reserves (tritonclient sets them from its own arguments).
_SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")
_IGNORED_PARAMS = ("headers", "binary_data_output")
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
FINAL_RESPONSE = "triton_final_response"

_KINDS = {
    InstanceGroup.KIND_UNSPECIFIED: mc.ModelInstanceGroup.KIND_AUTO,
    InstanceGroup.KIND_CPU: mc.ModelInstanceGroup.KIND_CPU,
    InstanceGroup.KIND_GPU: mc.ModelInstanceGroup.KIND_GPU,
}


def _server_version() -> str:
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


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _tensor_metadata(specs) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    return [v2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]


def platform(served: ServedModel) -> str:
    return f"pipeserve:{served.task_name}"


def model_config(served: ServedModel, signature: V2Signature) -> mc.ModelConfig:
    """The model as Triton's ModelConfig: tensors, versions, instances, and how we batch.

    max_batch_size is 0 because the dims are the whole request shape (the first dimension counts
    the request's inputs, any number); the server batches inputs across requests behind that, up
    to the `max_batch_size` parameter.
    """
    config: ModelConfig = served.config
    out = mc.ModelConfig(name=config.name, platform=platform(served), backend=config.backend, max_batch_size=0)
    policy = config.version_policy
    kind = policy.WhichOneof("policy")
    if kind == "all":
        out.version_policy.all.SetInParent()
    elif kind == "specific":
        out.version_policy.specific.versions.extend(policy.specific.versions)
    else:
        out.version_policy.latest.num_versions = policy.latest.num_versions or 1
    for spec in signature.inputs:
        out.input.append(mc.ModelInput(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape),
                                       optional=spec.optional))
    for spec in signature.outputs:
        out.output.append(mc.ModelOutput(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape)))
    for i, group in enumerate(config.instance_group or [InstanceGroup(count=1)]):
        out.instance_group.append(mc.ModelInstanceGroup(
            name=f"{config.name}_{i}", kind=_KINDS.get(group.kind, mc.ModelInstanceGroup.KIND_AUTO),
            count=group.count or 1, gpus=list(group.gpus)))
    out.model_transaction_policy.decoupled = signature.decoupled
    batching = config.dynamic_batching
    facts = {
        "task": served.task_name,
        "max_batch_size": str(config.max_batch_size),
        "max_queue_delay_microseconds": str(batching.max_queue_delay_microseconds),
        "max_queue_size": str(batching.max_queue_size or 1024),
        "priority_levels": str(batching.priority_levels),
        "max_sequence_length": str(config.max_sequence_length),
    }
    if signature.parameters is not None:
        facts["request_parameters"] = ", ".join(sorted(signature.parameters))
    for key, value in facts.items():
        out.parameters[key].string_value = value
    return out


class KServeServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane
        self.registry = plane.registry

    # -- health: answered even while draining (ready turns false), never refused ----------------

    async def ServerLive(self, request: v2.ServerLiveRequest, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.registry.started and not self.plane.gate.draining)

    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            served = self.registry.get(request.name, parse_version(request.version))
        except PipeserveError:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=served.ready() and not self.plane.gate.draining)

    # -- metadata -------------------------------------------------------------------------------

    @unary_rpc()
    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

    @unary_rpc()
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        served = self.registry.get(request.name, parse_version(request.version))
        signature = codec_for(served).signature
        return v2.ModelMetadataResponse(
            name=served.name,
            versions=[str(v) for v in sorted(self.registry.served.get(served.name, {}))],
            platform=platform(served),
            inputs=_tensor_metadata(signature.inputs),
            outputs=_tensor_metadata(signature.outputs),
        )

    @unary_rpc()
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        served = self.registry.get(request.name, parse_version(request.version))
        return v2.ModelConfigResponse(config=model_config(served, codec_for(served).signature))

    # -- inference ------------------------------------------------------------------------------

    @unary_rpc()
    async def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        responses = [r async for r in self._responses(request, timeout_of(context))]
        return responses[-1]

    @stream_rpc()
    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Triton's streaming: requests and responses on one bidirectional stream, each request
        served as it arrives (responses may come out of order; `id` pairs them)."""
        out: asyncio.Queue = asyncio.Queue()
        slots = asyncio.Semaphore(MAX_STREAM_IN_FLIGHT)
        pending: set[asyncio.Task] = set()

        async def serve(request: v2.ModelInferRequest) -> None:
            try:
                # Each request gets what is left of the stream's deadline when it arrives.
                async for response in self._responses(request, timeout_of(context), streaming=True):
                    await out.put(v2.ModelStreamInferResponse(infer_response=response))
            except PipeserveError as exc:
                await out.put(_stream_error(request, exc.message))
            except Exception as exc:
                log.exception("stream request %r failed", request.id)
                await out.put(_stream_error(request, f"internal error: {type(exc).__name__}: {exc}"))
            finally:
                slots.release()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(serve(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.wait(set(pending))
            finally:
                await out.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await out.get()) is not None:
                yield message
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def _responses(self, request: v2.ModelInferRequest, deadline_s: float | None,
                         streaming: bool = False) -> AsyncIterator[v2.ModelInferResponse]:
        """The responses to one request: one, or on a stream to a decoupled model (generation), one
        per batch of new tokens."""
        served = self.registry.get(request.model_name, parse_version(request.model_version))
        codec = codec_for(served)
        signature = codec.signature
        params, priority, timeout, empty_final = self._split_parameters(request, deadline_s)
        # "stream" chooses between one response and many; only a stream can carry many.
        stream = bool(params.pop("stream", True)) and streaming if signature.decoupled else False
        requested = self._requested_outputs(request, signature)
        tensors = self._decode_inputs(request, signature)
        check_parameters(signature, params, served.task_name)
        inputs, task_params = codec.decode(tensors, params, requested)
        version = parse_version(request.model_version)
        if stream:
            if len(inputs) != 1:
                raise InvalidArgument(f"input {signature.inputs[0].name}", f"holds {len(inputs)} inputs; a streamed "
                                      "request takes one (send one request per input on the stream)")
            answered, events = self.plane.stream(served.task_name, inputs[0], task_params, model=served.name,
                                                 version=version, timeout=timeout)
            # aclosing: however the stream ends (the client gone too), the sequence stops now.
            async with contextlib.aclosing(events):
                async for event in events:
                    yield self._response(request, answered, signature, codec.encode_event(event), requested,
                                         final=False if empty_final else None)
            if empty_final:
                yield self._response(request, answered, signature, {}, requested, final=True)
            return
        answered, results = await self.plane.infer(
            served.task_name, inputs, task_params, model=served.name, version=version, timeout=timeout,
            priority=priority,
        )
        yield self._response(request, answered, signature, codec.encode(results, task_params), requested,
                             final=True if empty_final else None)

    @staticmethod
    def _response(request: v2.ModelInferRequest, served: ServedModel, signature: V2Signature,
                  arrays: dict[str, Any], requested: set[str], final: bool | None) -> v2.ModelInferResponse:
        """A response with the outputs asked for (all, when none are named), in signature order;
        `final` sets triton_final_response, for clients that asked for an empty final response."""
        response = v2.ModelInferResponse(model_name=served.name, model_version=str(served.version), id=request.id)
        for spec in signature.outputs:
            if spec.name in arrays and (not requested or spec.name in requested):
                meta, raw = encode_tensor(spec.name, spec.datatype, arrays[spec.name])
                response.outputs.append(meta)
                response.raw_output_contents.append(raw)
        if final is not None:
            response.parameters[FINAL_RESPONSE].CopyFrom(infer_parameter(final))
        return response

    @staticmethod
    def _split_parameters(request: v2.ModelInferRequest,
                          deadline_s: float | None) -> tuple[dict[str, Any], int, float | None, bool]:
        """(task parameters, priority, timeout in seconds, empty-final-response flag)."""
        params = {key: parameter_value(p) for key, p in request.parameters.items()}
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

    @staticmethod
    def _requested_outputs(request: v2.ModelInferRequest, signature: V2Signature) -> set[str]:
        requested = set()
        for output in request.outputs:
            if signature.output(output.name) is None:
                names = ", ".join(s.name for s in signature.outputs)
                raise InvalidArgument(f"output {output.name}", f"is not an output of this model; its outputs: {names}")
            if "classification" in output.parameters:
                raise InvalidArgument(f"output {output.name}", "the classification extension is not supported; "
                                      "classification models return LABEL and SCORE, with the top_k parameter")
            requested.add(output.name)
        return requested

    @staticmethod
    def _decode_inputs(request: v2.ModelInferRequest, signature: V2Signature) -> dict[str, Any]:
        raws = request.raw_input_contents
        if raws and len(raws) != len(request.inputs):
            raise InvalidArgument("raw_input_contents",
                                  f"has {len(raws)} entries for {len(request.inputs)} inputs; send one per input")
        check_tensors(signature, [(t.name, t.datatype, list(t.shape)) for t in request.inputs])
        return {t.name: decode_tensor(t, raws[i] if raws else None) for i, t in enumerate(request.inputs)}

    # -- statistics -------------------------------------------------------------------------------

    @unary_rpc()
    async def ModelStatistics(self, request: v2.ModelStatisticsRequest, context) -> v2.ModelStatisticsResponse:
        if request.name:
            wanted = parse_version(request.version)
            if wanted:
                models = [self.registry.get(request.name, wanted)]
            else:
                self.registry.get(request.name)  # NOT_FOUND names the models that exist
                models = list(self.registry.served[request.name].values())
        else:
            models = self.registry.all_served()
        models = sorted(models, key=lambda m: (m.name, m.version))
        return v2.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    # -- model repository ---------------------------------------------------------------------------

    def _check_repository(self, name: str) -> None:
        if name and name != self.registry.repository.root.name:
            raise ModelNotFound(f"repository {name!r} is not served; the server has one repository, "
                                f"{self.registry.repository.root.name!r} (or send an empty name)")

    @unary_rpc()
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context) -> v2.RepositoryIndexResponse:
        self._check_repository(request.repository_name)
        statuses = self.registry.status
        names = sorted(set(self.registry.repository.model_names()) | {name for name, _ in statuses})
        index = []
        for name in names:
            versions = sorted((v, s) for (n, v), s in statuses.items() if n == name)
            if not versions:
                if not request.ready:
                    index.append(v2.RepositoryIndexResponse.ModelIndex(name=name, state="UNAVAILABLE", reason="not loaded"))
                continue
            for number, status in versions:
                state = "UNAVAILABLE" if status.state == "FAILED" else status.state
                if request.ready and state != "READY":
                    continue
                index.append(v2.RepositoryIndexResponse.ModelIndex(
                    name=name, version=str(number) if number else "", state=state, reason=status.reason))
        return v2.RepositoryIndexResponse(models=index)

    @unary_rpc()
    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest, context) -> v2.RepositoryModelLoadResponse:
        self.registry.require_control()
        self._check_repository(request.repository_name)
        for key in request.parameters:
            raise InvalidArgument(f"parameters.{key}", "overriding config.pbtxt or files in a load request is not "
                                  "supported; change the model's folder in the repository and load it again")
        await self.registry.load(request.model_name)
        return v2.RepositoryModelLoadResponse()

    @unary_rpc()
    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context) -> v2.RepositoryModelUnloadResponse:
        self.registry.require_control()
        self._check_repository(request.repository_name)
        try:
            await self.registry.unload(request.model_name)
        except ModelNotFound:
            # As Triton: unloading a repository model that is not loaded is done already.
            if request.model_name not in self.registry.repository.model_names():
                raise
        return v2.RepositoryModelUnloadResponse()

    # -- not supported: shared memory, tracing and log settings ----------------------------------------

    @unary_rpc()
    async def SystemSharedMemoryStatus(self, request, context):
        raise Unimplemented("system shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def SystemSharedMemoryRegister(self, request, context):
        raise Unimplemented("system shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def SystemSharedMemoryUnregister(self, request, context):
        raise Unimplemented("system shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def CudaSharedMemoryStatus(self, request, context):
        raise Unimplemented("CUDA shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def CudaSharedMemoryRegister(self, request, context):
        raise Unimplemented("CUDA shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def CudaSharedMemoryUnregister(self, request, context):
        raise Unimplemented("CUDA shared memory is not supported; send tensors in the request")

    @unary_rpc()
    async def TraceSetting(self, request, context):
        raise Unimplemented("tracing is not supported; use --log-level debug for one log line per request")

    @unary_rpc()
    async def LogSettings(self, request, context):
        raise Unimplemented("log settings are not supported at run time; use --log-level and --log-format")


def _stream_error(request: v2.ModelInferRequest, message: str) -> v2.ModelStreamInferResponse:
    return v2.ModelStreamInferResponse(
        error_message=message,
        infer_response=v2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                             id=request.id),
    )


def _duration(count: int, ns: int) -> v2.StatisticDuration:
    return v2.StatisticDuration(count=count, ns=ns)


def _statistics(served: ServedModel) -> v2.ModelStatistics:
    s = served.stats
    return v2.ModelStatistics(
        name=served.name,
        version=str(served.version),
        inference_count=s.inferences,
        execution_count=s.executions,
        inference_stats=v2.InferStatistics(
            success=_duration(s.success, s.request.total_ns),
            fail=_duration(s.failure + s.rejected, 0),
            queue=_duration(s.queue.count, s.queue.total_ns),
            compute_infer=_duration(s.compute.count, s.compute.total_ns),
        ),
        # Per batch size only the count is kept (compute time is kept for all batches together).
        batch_stats=[v2.InferBatchStatistics(batch_size=size, compute_infer=_duration(n, 0))
                     for size, n in sorted(s.batch_sizes.items())],
    )
