"""One loaded model version: its task, its instances, its batcher and its statistics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch

from pipeserve.backends.base import Instance, InstanceDead, ModelSpec
from pipeserve.backends.registry import create_backend
from pipeserve.server.errors import DeadlineExceeded, InvalidArgument, Unimplemented
from pipeserve.server.repository.repository import ModelVersionSource
from pipeserve.server.scheduling.batcher import DynamicBatcher
from pipeserve.server.scheduling.instances import (
    INTRA_OP_THREADS,
    InstanceGroup,
    ModelInstance,
    cpu_threads_per_instance,
    plan_devices,
)
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.scheduling.work import Request, WorkItem
from pipeserve.server.tasks.base import Task, TaskContext, TaskParams
from pipeserve.server.tasks.registry import canonical_task_name, task_class
from pipeserve.v1.model_config_pb2 import ModelConfig

log = logging.getLogger("pipeserve.models")

# Seconds between attempts to load a dead instance again, doubling after each failure up to the cap.
RESTART_BACKOFF_S = (0.5, 30.0)


class ServedModel:
    """A model version ready for requests. Build it with `await ServedModel.load(...)`."""

    def __init__(self, config: ModelConfig, source: ModelVersionSource, task: Task, group: InstanceGroup,
                 load_instance: Callable[[torch.device], Instance] | None = None):
        self.config = config
        self.source = source
        self.name = config.name
        self.version = source.version
        self.task = task
        self.task_name = canonical_task_name(config.task) or config.task
        self.group = group
        # Loads one more backend instance on a device: how a dead instance is replaced.
        self._load_instance = load_instance
        self._restarts: set[asyncio.Task] = set()
        self._closing = False
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
            merge_requests=config.HasField("dynamic_batching"),
            on_instance_dead=self._on_instance_dead if load_instance is not None else None,
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
            try:
                served.engine = served.task.start_engine(served)
            except BaseException:
                await served.close()  # e.g. a backend without step-wise decoding: free the instances
                raise
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
        threads = cpu_threads_per_instance(sum(1 for d in devices if d.type == "cpu"),
                                           requested=config.backend_parameters.get(INTRA_OP_THREADS, ""))
        instances = []
        try:
            for index, device in enumerate(devices):
                instances.append(ModelInstance(index, backend.load(spec, device), threads if device.type == "cpu" else 1))
        except BaseException:
            for inst in instances:
                inst.close()
            raise
        return cls(config, source, task, InstanceGroup(instances), load_instance=lambda device: backend.load(spec, device))

    def _execute(self, instance: ModelInstance, batch: Sequence[WorkItem]) -> list[Any]:
        return self.task.run_batch(instance.backend_instance, [it.payload for it in batch], [it.params for it in batch])

    async def submit(
        self, inputs: Sequence[Any], params: TaskParams, deadline: float | None = None, priority: int = 0
    ) -> list[Any]:
        """Runs a request's inputs through the batcher; returns one result per input.

        `deadline` is a time.monotonic() instant: inputs still queued then are dropped unrun and
        the call fails with DEADLINE_EXCEEDED. Cancelling the call withdraws its queued inputs.
        """
        if self.engine is not None:  # generation tasks run on the continuous batching engine
            return await self._generate(inputs, params, deadline)
        loop = asyncio.get_running_loop()
        request = Request(loop.create_future(), len(inputs), deadline, priority)
        key, size = params.batch_key, self.task.size
        items = [WorkItem(request, i, x, params, key, size(x)) for i, x in enumerate(inputs)]
        self.batcher.submit(request, items)
        stats = self.stats
        stats.in_flight += 1
        started = time.monotonic()
        timer = None
        if deadline is not None:
            timer = loop.call_later(max(0.0, deadline - started), request.fail,
                                    DeadlineExceeded("the deadline passed before the model answered"))
        try:
            results = await request.future
        except BaseException as exc:
            # Failed, past its deadline, or cancelled: its other inputs leave the queue now.
            self.batcher.withdraw(request, items)
            stats.failure += 1
            if stats.listeners:
                stats.notify("failure_seconds", time.monotonic() - started)
            if isinstance(exc, InvalidArgument) and request.failed_index is not None:
                raise exc.for_input(request.failed_index) from None
            raise
        finally:
            stats.in_flight -= 1
            if timer is not None:
                timer.cancel()
        elapsed = time.monotonic() - started
        stats.success += 1
        stats.request.add(elapsed)
        if stats.listeners:
            stats.notify("success_seconds", elapsed)
        return results

    async def _generate(self, inputs: Sequence[Any], params: TaskParams, deadline: float | None) -> list[Any]:
        stats = self.stats
        stats.in_flight += 1
        started = time.monotonic()
        try:
            results = await self.task.generate(self.engine, inputs, params, deadline)  # type: ignore[attr-defined]
        except BaseException:
            stats.failure += 1
            raise
        finally:
            stats.in_flight -= 1
        stats.success += 1
        stats.request.add(time.monotonic() - started)
        return results

    async def stream(self, item: Any, params: TaskParams, deadline: float | None = None) -> AsyncIterator[Any]:
        """Runs one input on the generation engine and yields its events as they come (those that
        piled up while the reader was busy arrive merged). Closing the iterator stops the sequence."""
        if self.engine is None:
            raise Unimplemented(f"model {self.label} serves {self.task_name}, which does not stream")
        stream = self.task.stream(self.engine, item, params, deadline)  # type: ignore[attr-defined]
        stats = self.stats
        stats.in_flight += 1
        try:
            async for event in stream.batches():
                yield event
        except BaseException:
            stats.failure += 1
            raise
        else:
            stats.success += 1
        finally:
            stream.cancel()  # a no-op once the sequence has ended
            stats.in_flight -= 1

    def ready(self) -> bool:
        return self.group.any_ready()

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
                self.batcher.wake()
                await asyncio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            instance.state = "ready"
            self.stats.instance_restarts += 1
            log.warning("model %s instance %d restarted (%d restarts so far)", self.label, instance.index,
                        self.stats.instance_restarts)
            self.batcher.wake()
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
        await self.batcher.drain()
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        if self.engine is not None and hasattr(self.engine, "close"):
            await self.engine.close()
        await asyncio.to_thread(self.group.close)


