"""pipeserve.v1.ModelService: listing, loading and unloading models, and their statistics."""

from __future__ import annotations

from pipeserve.server.adapters.status import unary_rpc
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.model_registry import ModelRegistry, ModelStatus
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.v1 import model_service_pb2 as pb
from pipeserve.v1 import model_service_pb2_grpc as pb_grpc


def summary(status: ModelStatus, registry: ModelRegistry) -> pb.ModelSummary:
    config = registry.configs.get(status.name)
    return pb.ModelSummary(
        name=status.name,
        version=status.version,
        task=status.task,
        backend=status.backend,
        state=pb.ModelState.Value(f"MODEL_STATE_{status.state}"),
        reason=status.reason,
        default_for_task=bool(config and config.default_for_task),
    )


def statistics(name: str, version: int, stats: ModelStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        success_count=stats.success,
        failure_count=stats.failure,
        inference_count=stats.inferences,
        execution_count=stats.executions,
        queue=pb.DurationStat(count=stats.queue.count, total_ns=stats.queue.total_ns),
        compute=pb.DurationStat(count=stats.compute.count, total_ns=stats.compute.total_ns),
        batch_sizes=dict(stats.batch_sizes),
        in_flight=stats.in_flight,
        queued=stats.queued,
        rejected_count=stats.rejected,
        generated_tokens=stats.generated_tokens,
        instance_restarts=stats.instance_restarts,
        active_sequences=stats.active_sequences,
        time_to_first_token=pb.DurationStat(count=stats.time_to_first_token.count,
                                            total_ns=stats.time_to_first_token.total_ns),
    )


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane
        self.registry = plane.registry

    @unary_rpc()
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        statuses = sorted(self.registry.status.values(), key=lambda s: (s.name, s.version))
        if request.ready_only:
            statuses = [s for s in statuses if s.state == "READY"]
        return pb.ListModelsResponse(models=[summary(s, self.registry) for s in statuses])

    @unary_rpc()
    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.GetModelResponse:
        config, _ = self.registry.repository.read_config(request.name)
        config = self.registry.configs.get(request.name, config)
        versions = [s for (n, _), s in sorted(self.registry.status.items()) if n == request.name]
        return pb.GetModelResponse(config=config, versions=[summary(s, self.registry) for s in versions])

    @unary_rpc()
    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.LoadModelResponse:
        self.registry.require_control()
        statuses = await self.registry.load(request.name)
        return pb.LoadModelResponse(versions=[summary(s, self.registry) for s in statuses])

    @unary_rpc()
    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.UnloadModelResponse:
        self.registry.require_control()
        await self.registry.unload(request.name)
        return pb.UnloadModelResponse()

    @unary_rpc()
    async def GetModelStatistics(self, request: pb.GetModelStatisticsRequest, context) -> pb.GetModelStatisticsResponse:
        if request.name:
            self.registry.get(request.name)  # NOT_FOUND names the models that exist
            models = list(self.registry.served[request.name].values())
        else:
            models = self.registry.all_served()
        return pb.GetModelStatisticsResponse(models=[statistics(m.name, m.version, m.stats) for m in models])
