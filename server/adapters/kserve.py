"""inference.GRPCInferenceService: the Open Inference Protocol (KServe v2), as Triton speaks it.

Every loaded model is a v2 model whose tensors come from its task's codec (kserve_codecs.py);
inference goes through `DataPlane.infer` like every other adapter. The service definition is the
one tritonclient ships (`tritonclient.grpc.service_pb2`), so Triton's clients work unchanged.
This module turns messages into kserve_inference's protocol-neutral requests and back, as the
REST adapter (http/kserve.py) does for JSON; Triton's model config and statistics messages are
built here and serve both (REST sends their JSON mapping, as Triton does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from pipeserve.server.adapters.kserve_inference import (
    EXTENSIONS,
    FINAL_RESPONSE,
    SERVER_NAME,
    InputTensor,
    RequestedOutput,
    V2Inference,
    V2Request,
    V2Response,
    parse_version,
    platform,
    repository_index,
    server_version,
)
from pipeserve.server.adapters.kserve_signature import V2Signature
from pipeserve.server.adapters.kserve_tensors import decode_tensor, encode_tensor, infer_parameter, parameter_value
from pipeserve.server.adapters.status import stream_rpc, timeout_of, unary_rpc
from pipeserve.server.control_plane import ControlPlane, ModelDescription, VersionStatistics
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, PipeserveError, Unimplemented
from pipeserve.server.repository.model_settings import InstanceGroupSettings

log = logging.getLogger("pipeserve.kserve")

# Requests one stream may have in flight before the server stops reading it (back-pressure).
MAX_STREAM_IN_FLIGHT = 256
_KINDS = {"auto": mc.ModelInstanceGroup.KIND_AUTO, "cpu": mc.ModelInstanceGroup.KIND_CPU,
          "gpu": mc.ModelInstanceGroup.KIND_GPU}


def _data_type(datatype: str) -> int:
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


def _tensor_metadata(specs) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    return [v2.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape)) for s in specs]


def model_config(model: ModelDescription, signature: V2Signature) -> mc.ModelConfig:
    """The model as Triton's ModelConfig: tensors, versions, instances, and how we batch.

    max_batch_size is 0 because the dims are the whole request shape (the first dimension counts
    the request's inputs, any number); the server batches inputs across requests behind that, up
    to the `max_batch_size` parameter.
    """
    settings = model.settings
    out = mc.ModelConfig(name=settings.name, platform=platform(model), backend=settings.backend, max_batch_size=0)
    policy = settings.version_policy
    if policy.kind == "all":
        out.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        out.version_policy.specific.versions.extend(policy.versions)
    else:
        out.version_policy.latest.num_versions = policy.num_versions
    for spec in signature.inputs:
        out.input.append(mc.ModelInput(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape),
                                       optional=spec.optional))
    for spec in signature.outputs:
        out.output.append(mc.ModelOutput(name=spec.name, data_type=_data_type(spec.datatype), dims=list(spec.shape)))
    for i, group in enumerate(settings.instance_groups or (InstanceGroupSettings(),)):
        out.instance_group.append(mc.ModelInstanceGroup(name=f"{settings.name}_{i}", kind=_KINDS[group.kind],
                                                        count=group.count, gpus=list(group.gpus)))
    out.model_transaction_policy.decoupled = signature.decoupled
    batching = settings.batching
    facts = {
        "task": model.task_name,
        "max_batch_size": str(settings.max_batch_size),
        "max_queue_delay_microseconds": str(batching.max_queue_delay_microseconds),
        "max_queue_size": str(batching.max_queue_size),
        "priority_levels": str(batching.priority_levels),
        "max_sequence_length": str(settings.max_sequence_length),
    }
    if signature.parameters is not None:
        facts["request_parameters"] = ", ".join(sorted(signature.parameters))
    for key, value in facts.items():
        out.parameters[key].string_value = value
    return out


class KServeServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane
        self.control = control
        self.inference = V2Inference(plane, control)

    # -- health: answered even while draining (ready turns false), never refused ----------------

    async def ServerLive(self, request: v2.ServerLiveRequest, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.control.server_ready())

    async def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            version = parse_version(request.version)
        except InvalidArgument:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self.control.model_ready(request.name, version))

    # -- metadata -------------------------------------------------------------------------------

    @unary_rpc()
    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    @unary_rpc()
    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        model, codec = self.inference.model(request.name, request.version)
        signature = codec.signature
        return v2.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.control.served_versions(model.name)],
            platform=platform(model),
            inputs=_tensor_metadata(signature.inputs),
            outputs=_tensor_metadata(signature.outputs),
        )

    @unary_rpc()
    async def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        model, codec = self.inference.model(request.name, request.version)
        return v2.ModelConfigResponse(config=model_config(model, codec.signature))

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
        async for response in self.inference.responses(_v2_request(request), deadline_s, streaming):
            yield _infer_response(response)

    # -- statistics -------------------------------------------------------------------------------

    @unary_rpc()
    async def ModelStatistics(self, request: v2.ModelStatisticsRequest, context) -> v2.ModelStatisticsResponse:
        found = self.control.statistics(request.name, parse_version(request.version) if request.name else 0)
        return v2.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in
                                                       sorted(found, key=lambda m: (m.name, m.version))])

    # -- model repository ---------------------------------------------------------------------------

    @unary_rpc()
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context) -> v2.RepositoryIndexResponse:
        index = [v2.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state, reason=e.reason)
                 for e in repository_index(self.control, request.repository_name, request.ready)]
        return v2.RepositoryIndexResponse(models=index)

    @unary_rpc()
    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest, context) -> v2.RepositoryModelLoadResponse:
        await self.control.load(request.model_name, repository=request.repository_name, overrides=request.parameters)
        return v2.RepositoryModelLoadResponse()

    @unary_rpc()
    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context) -> v2.RepositoryModelUnloadResponse:
        # As Triton: unloading a repository model that is not loaded is done already.
        await self.control.unload(request.model_name, repository=request.repository_name, not_loaded_ok=True)
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


def _v2_request(request: v2.ModelInferRequest) -> V2Request:
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise InvalidArgument("raw_input_contents",
                              f"has {len(raws)} entries for {len(request.inputs)} inputs; send one per input")

    def tensor(i: int, t: v2.ModelInferRequest.InferInputTensor) -> InputTensor:
        return InputTensor(t.name, t.datatype, tuple(t.shape), lambda: decode_tensor(t, raws[i] if raws else None))

    return V2Request(
        model_name=request.model_name,
        model_version=request.model_version,
        inputs=[tensor(i, t) for i, t in enumerate(request.inputs)],
        parameters={key: parameter_value(p) for key, p in request.parameters.items()},
        outputs=[RequestedOutput(o.name, {key: parameter_value(p) for key, p in o.parameters.items()})
                 for o in request.outputs],
        id=request.id,
    )


def _infer_response(response: V2Response) -> v2.ModelInferResponse:
    """Outputs in raw_output_contents, as Triton sends them; `final` as triton_final_response."""
    message = v2.ModelInferResponse(model_name=response.model_name, model_version=response.model_version,
                                    id=response.id)
    for spec, array in response.outputs:
        meta, raw = encode_tensor(spec.name, spec.datatype, array)
        message.outputs.append(meta)
        message.raw_output_contents.append(raw)
    if response.final is not None:
        message.parameters[FINAL_RESPONSE].CopyFrom(infer_parameter(response.final))
    return message


def _stream_error(request: v2.ModelInferRequest, message: str) -> v2.ModelStreamInferResponse:
    return v2.ModelStreamInferResponse(
        error_message=message,
        infer_response=v2.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                             id=request.id),
    )


def _duration(count: int, ns: int) -> v2.StatisticDuration:
    return v2.StatisticDuration(count=count, ns=ns)


def model_statistics(model: VersionStatistics) -> v2.ModelStatistics:
    s = model.stats
    return v2.ModelStatistics(
        name=model.name,
        version=str(model.version),
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
