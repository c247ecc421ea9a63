"""Model instances: one copy of a model per device slot, each with its own worker thread."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pipeserve.backends.base import Instance
from pipeserve.v1.model_config_pb2 import InstanceGroup as InstanceGroupConfig


def plan_devices(groups: list[InstanceGroupConfig]) -> list[torch.device]:
    """Expands instance groups into one device per instance (count x kind x gpus)."""
    if not groups:
        groups = [InstanceGroupConfig(count=1, kind=InstanceGroupConfig.KIND_UNSPECIFIED)]
    have_cuda = torch.cuda.is_available()
    devices: list[torch.device] = []
    for group in groups:
        count = group.count or 1
        kind = group.kind
        if kind == InstanceGroupConfig.KIND_UNSPECIFIED:
            kind = InstanceGroupConfig.KIND_GPU if have_cuda else InstanceGroupConfig.KIND_CPU
        if kind == InstanceGroupConfig.KIND_CPU:
            devices += [torch.device("cpu")] * count
            continue
        if not have_cuda:
            raise RuntimeError("instance_group asks for KIND_GPU but no CUDA device is visible")
        gpus = list(group.gpus) or list(range(torch.cuda.device_count()))
        for gpu in gpus:
            if gpu >= torch.cuda.device_count():
                raise RuntimeError(f"instance_group asks for GPU {gpu} but only {torch.cuda.device_count()} are visible")
            devices += [torch.device("cuda", gpu)] * count
    return devices


def cpu_threads_per_instance(cpu_instances: int) -> int:
    """Splits the CPU's cores among CPU instances so that they do not oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, cpu_instances))


@dataclass(eq=False)
class ModelInstance:
    """A backend instance, its worker thread, and how much work it holds."""

    index: int
    backend_instance: Instance
    threads: int
    # Batches handed to this instance and not finished yet.
    outstanding: int = 0
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"instance-{self.index}",
            initializer=self._init_thread,
        )

    def _init_thread(self) -> None:
        # torch's intra-op pool size is per calling thread: give this worker its share of cores.
        torch.set_num_threads(self.threads)

    @property
    def device(self) -> torch.device:
        return self.backend_instance.device

    def ready(self) -> bool:
        return self.backend_instance.ready()

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.backend_instance.close()


class InstanceGroup:
    """The instances of one model version; picks the ready instance with the least work."""

    def __init__(self, instances: list[ModelInstance], max_outstanding: int = 1):
        self.instances = instances
        # One batch per instance at a time: the next batch keeps filling while this one runs,
        # which is what makes batches large under load.
        self.max_outstanding = max_outstanding
        self._lock = threading.Lock()

    def pick(self) -> ModelInstance | None:
        """The least busy ready instance with room for a batch, or None."""
        best = None
        for inst in self.instances:
            if inst.outstanding < self.max_outstanding and inst.ready():
                if best is None or inst.outstanding < best.outstanding:
                    best = inst
        return best

    def any_ready(self) -> bool:
        return any(inst.ready() for inst in self.instances)

    def close(self) -> None:
        for inst in self.instances:
            inst.close()
