"""One loaded model version: its task, its instances, its batcher and its statistics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any


from pipeserve.backends.base import ModelSpec
from pipeserve.backends.registry import create_backend
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.repository.repository import ModelVersionSource
from pipeserve.server.scheduling.batcher import DynamicBatcher
from pipeserve.server.scheduling.instances import InstanceGroup, ModelInstance, cpu_threads_per_instance, plan_devices
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.scheduling.work import WorkItem
from pipeserve.server.tasks.base import Task, TaskContext, TaskParams
from pipeserve.server.tasks.registry import canonical_task_name, task_class
from pipeserve.v1.model_config_pb2 import ModelConfig

log = logging.getLogger("pipeserve.models")


class ServedModel:
    """A model version ready for requests. Build it with `await ServedModel.load(...)`."""

    def __init__(self, config: ModelConfig, source: ModelVersionSource, task: Task, group: InstanceGroup):
        self.config = config
        self.source = source
        self.name = config.name
        self.version = source.version
        self.task = task
        self.task_name = canonical_task_name(config.task) or config.task
        self.group = group
        self.stats = ModelStats()
        batching = config.dynamic_batching
        self.batcher = DynamicBatcher(
            f"{self.name}/{self.version}",
            group,
            self._execute,
            self.stats,
            max_batch_size=config.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_microseconds / 1e6,
            preferred_batch_sizes=list(batching.preferred_batch_size),
            max_queue_size=batching.max_queue_size or 1024,
            priority_levels=batching.priority_levels,
            default_priority=batching.default_priority_level,
        )
        # Generation tasks attach a continuous-batching engine here (see generation/).
        self.engine: Any = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    async def load(cls, config: ModelConfig, source: ModelVersionSource) -> ServedModel:
        """Loads the task (tokenizer) and every instance off the event loop, then starts batching."""
        served = await asyncio.to_thread(cls._load_blocking, config, source)
        served.batcher.start()
        if hasattr(served.task, "start_engine"):
            served.engine = served.task.start_engine(served)
        return served

    @classmethod
    def _load_blocking(cls, config: ModelConfig, source: ModelVersionSource) -> ServedModel:
        from transformers import AutoConfig

        where = str(source.local_path) if source.local_path is not None else source.hub_id
        context_kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        if source.revision:
            context_kwargs["revision"] = source.revision
        hf_config = None
        try:
            hf_config = AutoConfig.from_pretrained(where, **context_kwargs)
        except (OSError, ValueError):
            # Exported artefacts (TorchScript, Triton) may come without a transformers config.
            log.debug("model %s has no transformers config at %s", config.name, where)
        task_cls = task_class(config.task)
        task = task_cls(TaskContext(config=config, source=where, revision=source.revision, hf_config=hf_config))
        backend = create_backend(config.backend)
        spec = ModelSpec(
            name=config.name,
            version=source.version,
            local_path=source.local_path,
            hub_id=source.hub_id,
            revision=source.revision,
            model_class=getattr(task, "model_class", task_cls.model_class),
            parameters=dict(config.backend_parameters),
            trust_remote_code=config.trust_remote_code,
            input_names=task_cls.input_names,
            output_names=task_cls.output_names,
        )
        devices = backend.devices(plan_devices(list(config.instance_group)))
        threads = cpu_threads_per_instance(sum(1 for d in devices if d.type == "cpu"))
        instances = []
        try:
            for index, device in enumerate(devices):
                instances.append(ModelInstance(index, backend.load(spec, device), threads if device.type == "cpu" else 1))
        except BaseException:
            for inst in instances:
                inst.close()
            raise
        return cls(config, source, task, InstanceGroup(instances))

    def _execute(self, instance: ModelInstance, batch: Sequence[WorkItem]) -> list[Any]:
        return self.task.run_batch(instance.backend_instance, [it.payload for it in batch], [it.params for it in batch])

    async def submit(
        self, inputs: Sequence[Any], params: TaskParams, deadline: float | None = None, priority: int = 0
    ) -> list[Any]:
        """Runs a request's inputs through the batcher; returns one result per input."""
        loop = asyncio.get_running_loop()
        items = [
            WorkItem(
                payload=x, params=params, batch_key=params.batch_key, size=self.task.size(x),
                future=loop.create_future(), deadline=deadline, priority=priority,
            )
            for x in inputs
        ]
        self.batcher.submit(items)
        self.stats.in_flight += 1
        try:
            results = await asyncio.gather(*(it.future for it in items))
        except InvalidArgument as exc:
            self._abandon(items)
            index = next(i for i, it in enumerate(items) if it.future.done() and not it.future.cancelled()
                         and it.future.exception() is exc)
            raise exc.for_input(index) from None
        except BaseException:
            self._abandon(items)
            raise
        finally:
            self.stats.in_flight -= 1
        self.stats.success += 1
        return results

    def _abandon(self, items: list[WorkItem]) -> None:
        """One input failed or the call was cancelled: the rest leave the queue now."""
        for it in items:
            it.future.cancel()
        self.stats.failure += 1

    def ready(self) -> bool:
        return self.group.any_ready()

    async def close(self) -> None:
        """Finishes queued and running work, then frees the instances."""
        await self.batcher.drain()
        if self.engine is not None and hasattr(self.engine, "close"):
            await self.engine.close()
        await asyncio.to_thread(self.group.close)


