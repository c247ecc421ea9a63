"""One loaded model version: its task, its instances, its runtime and its statistics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch

from pipeserve.backends.base import Instance, InstanceDead, ModelSpec
from pipeserve.backends.registry import create_backend
from pipeserve.server.errors import ConfigError
from pipeserve.server.repository.model_settings import ModelSettings
from pipeserve.server.repository.repository import ModelVersionSource
from pipeserve.server.runtime.batched import BatchedRuntime
from pipeserve.server.runtime.generation import GenerationRuntime
from pipeserve.server.scheduling.instances import (
    INTRA_OP_THREADS,
    InstancePool,
    ModelInstance,
    cpu_threads_per_instance,
    lone_instance_threads,
    plan_devices,
)
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.tasks.base import Task, TaskContext, TaskParams
from pipeserve.server.tasks.registry import canonical_task_name, task_class

log = logging.getLogger("pipeserve.models")

# Seconds between attempts to load a dead instance again, doubling after each failure up to the cap.
RESTART_BACKOFF_S = (0.5, 30.0)


class ServedModel:
    """A model version ready for requests. Build it with `await ServedModel.load(...)`.

    Its runtime follows the task's kind: a batched runtime (the dynamic batcher) or a generation
    runtime (the continuous batching engine); the requests, restarts and statistics are the same.
    """

    def __init__(self, settings: ModelSettings, source: ModelVersionSource, task: Task, pool: InstancePool,
                 load_instance: Callable[[torch.device], Instance] | None = None):
        self.settings = settings
        self.source = source
        self.name = settings.name
        self.version = source.version
        self.task = task
        self.task_name = canonical_task_name(settings.task) or settings.task
        self.pool = pool
        # Loads one more backend instance on a device: how a dead instance is replaced.
        self._load_instance = load_instance
        self._restarts: set[asyncio.Task] = set()
        self._closing = False
        self.stats = ModelStats()
        on_dead = self._on_instance_dead if load_instance is not None else None
        runtime_class = GenerationRuntime if task.kind == "generation" else BatchedRuntime
        self.runtime: BatchedRuntime | GenerationRuntime = runtime_class(
            self.label, task, pool, settings, self.stats, on_dead)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @classmethod
    async def load(cls, settings: ModelSettings, source: ModelVersionSource) -> ServedModel:
        """Loads the task (tokenizer) and every instance off the event loop, then starts the runtime."""
        served = await asyncio.to_thread(cls._load_blocking, settings, source)
        served.runtime.start()
        return served

    @classmethod
    def _load_blocking(cls, settings: ModelSettings, source: ModelVersionSource) -> ServedModel:
        from transformers import AutoConfig

        where = str(source.local_path) if source.local_path is not None else source.hub_id
        context_kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
        if source.revision:
            context_kwargs["revision"] = source.revision
        hf_config = None
        try:
            hf_config = AutoConfig.from_pretrained(where, **context_kwargs)
        except (OSError, ValueError):
            # Exported artefacts (TorchScript, Triton) may come without a transformers config.
            log.debug("model %s has no transformers config at %s", settings.name, where)
        task_cls = task_class(settings.task)
        task = task_cls(TaskContext(settings=settings, source=where, revision=source.revision, hf_config=hf_config))
        backend = create_backend(settings.backend)
        spec = ModelSpec(
            name=settings.name,
            version=source.version,
            local_path=source.local_path,
            hub_id=source.hub_id,
            revision=source.revision,
            model_class=getattr(task, "model_class", task_cls.model_class),
            parameters=dict(settings.backend_parameters),
            trust_remote_code=settings.trust_remote_code,
            input_names=task_cls.input_names,
            output_names=task_cls.output_names,
        )
        devices = backend.devices(plan_devices(settings.instance_groups))
        cpu_instances = sum(1 for d in devices if d.type == "cpu")
        requested_threads = settings.backend_parameters.get(INTRA_OP_THREADS, "")
        threads = cpu_threads_per_instance(cpu_instances, requested=requested_threads)
        lone_threads = lone_instance_threads(cpu_instances, threads, requested_threads)
        instances = []
        try:
            for index, device in enumerate(devices):
                instances.append(ModelInstance(index, backend.load(spec, device), threads if device.type == "cpu" else 1))
            if task.kind == "generation":
                _check_decoding(settings, instances)
        except BaseException:
            for inst in instances:
                inst.close()
            raise
        return cls(settings, source, task, InstancePool(instances, lone_threads=lone_threads),
                   load_instance=lambda device: backend.load(spec, device))

    async def submit(self, inputs: Sequence[Any], params: TaskParams, deadline: float | None = None,
                     priority: int = 0) -> list[Any]:
        """Runs a request's inputs; one result per input. `deadline` is a time.monotonic() instant;
        cancelling the call withdraws its work."""
        return await self.runtime.submit(inputs, params, deadline, priority)

    def stream(self, item: Any, params: TaskParams, deadline: float | None = None) -> AsyncIterator[Any]:
        """One input's events as they are made (generation tasks; others: UNIMPLEMENTED). Closing
        the iterator stops the work."""
        return self.runtime.stream(item, params, deadline)

    def ready(self) -> bool:
        return self.pool.any_ready()

    # -- restarting dead instances ------------------------------------------------------------------

    def _on_instance_dead(self, instance: ModelInstance, error: InstanceDead) -> None:
        """The batcher saw `instance` die: load a new one in its place, in the background."""
        if self._closing:
            instance.state = "dead"
            return
        task = asyncio.get_running_loop().create_task(self._restart(instance), name=f"restart:{self.label}/{instance.index}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(self, instance: ModelInstance) -> None:
        """Loads the instance again until it works or the model unloads, backing off between tries.
        Work queued meanwhile waits for the first try (or goes to other instances); after a failed
        try the instance is "dead" and, with no other instance ready, queued work fails UNAVAILABLE."""
        loop = asyncio.get_running_loop()
        delay, cap = RESTART_BACKOFF_S
        while not self._closing:
            instance.state = "restarting"
            try:
                # In the instance's own worker thread: its share of cores, and no batch runs there now.
                await loop.run_in_executor(instance.executor, self._reload_blocking, instance)
            except Exception as exc:
                log.error("model %s instance %d failed to load again (retrying in %.1fs): %s: %s",
                          self.label, instance.index, delay, type(exc).__name__, exc)
                instance.state = "dead"
                self.runtime.wake()
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            instance.state = "ready"
            self.stats.instance_restarts += 1
            log.warning("model %s instance %d restarted (%d restarts so far)", self.label, instance.index,
                        self.stats.instance_restarts)
            self.runtime.wake()
            return

    def _reload_blocking(self, instance: ModelInstance) -> None:
        assert self._load_instance is not None
        device = instance.backend_instance.device
        try:
            instance.backend_instance.close()
        except Exception:
            log.exception("model %s instance %d failed to close after it died", self.label, instance.index)
        # Assigned here, in the worker thread, so that close() after an unload frees it even if
        # the restart task was cancelled meanwhile.
        instance.backend_instance = self._load_instance(device)
        instance.backend_instance.warm_up()

    async def close(self) -> None:
        """Finishes queued and running work, then frees the instances."""
        await self.runtime.drain()
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        await self.runtime.close()
        await asyncio.to_thread(self.pool.close)


def _check_decoding(settings: ModelSettings, instances: Sequence[ModelInstance]) -> None:
    """A generation model needs step-wise decoding from its backend: refused at load, with the reason."""
    for inst in instances:
        backend_instance = inst.backend_instance
        if not backend_instance.supports_decoding:
            reason = getattr(backend_instance, "decoding_unsupported", "") or \
                "its instances have no step-wise decoding (Instance.prefill/decode); use backend: \"eager\""
            raise ConfigError(f"{settings.name}/config.pbtxt", "backend",
                              f"{settings.backend!r} cannot serve this model for {settings.task}: {reason}")


