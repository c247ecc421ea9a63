"""pipeserve.v1.ModelService over the control plane: listing, loading and unloading models, and their statistics."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.control_plane import ControlPlane, ModelEntry, VersionState, VersionStatistics
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.repository.config import settings_to_proto
from pipeserve.server.scheduling.stats import Duration
from pipeserve.v1 import model_service_pb2 as pb
from pipeserve.v1 import model_service_pb2_grpc as pb_grpc
from pipeserve.v1.model_config_pb2 import ModelConfig


def summary(state: VersionState) -> pb.ModelSummary:
    return pb.ModelSummary(
        name=state.name,
        version=state.version,
        task=state.task,
        backend=state.backend,
        state=pb.ModelState.Value(f"MODEL_STATE_{state.state}"),
        reason=state.reason,
        default_for_task=state.default_for_task,
    )


def config(entry: ModelEntry) -> ModelConfig:
    """The model's settings with every default written out; for a config.pbtxt that does not
    validate, what it names (the versions' reasons say what is wrong)."""
    if entry.settings is not None:
        return settings_to_proto(entry.settings)
    error = entry.config_error
    assert error is not None  # no settings: the config did not validate
    return ModelConfig(name=entry.name, task=error.task, backend=error.backend)


def _duration(duration: Duration) -> pb.DurationStat:
    return pb.DurationStat(count=duration.count, total_ns=duration.total_ns)


def statistics(model: VersionStatistics) -> pb.ModelStatistics:
    stats = model.stats
    return pb.ModelStatistics(
        name=model.name,
        version=model.version,
        success_count=stats.success,
        failure_count=stats.failure,
        inference_count=stats.inferences,
        execution_count=stats.executions,
        queue=_duration(stats.queue),
        compute=_duration(stats.compute),
        batch_sizes=dict(stats.batch_sizes),
        in_flight=stats.in_flight,
        queued=stats.queued,
        rejected_count=stats.rejected,
        generated_tokens=stats.generated_tokens,
        instance_restarts=stats.instance_restarts,
        active_sequences=stats.active_sequences,
        time_to_first_token=_duration(stats.time_to_first_token),
    )


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane  # its gate: calls are refused once the server drains
        self.control = control

    @unary_rpc()
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[summary(s) for s in self.control.versions(ready_only=request.ready_only)])

    @unary_rpc()
    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        entry = self.control.model(request.name)
        return pb.GetModelResponse(config=config(entry), versions=[summary(s) for s in entry.versions])

    @unary_rpc()
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        return pb.LoadModelResponse(versions=[summary(s) for s in await self.control.load(request.name)])

    @unary_rpc()
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        await self.control.unload(request.name)
        return pb.UnloadModelResponse()

    @unary_rpc()
    async def GetModelStatistics(self, request: pb.GetModelStatisticsRequest, context) -> pb.GetModelStatisticsResponse:
        return pb.GetModelStatisticsResponse(models=[statistics(m) for m in self.control.statistics(request.name)])
