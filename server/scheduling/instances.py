"""Model instances: one copy of a model per device slot, each with its own worker thread.

An instance group in config.pbtxt is count x kind x device ids; `plan_devices` expands it into one
device per instance. CPU instances share the cores between them (each worker thread sets its own
torch intra-op thread count, which torch and OpenMP keep per calling thread); GPU instances run on
their own CUDA stream (the backend's instance owns it) with their device made current in the worker.

A CPU instance that runs while its model's other CPU instances are idle takes all their cores for
that batch (`InstancePool.threads_for`): a lone request on a compute-bound model then runs as fast
as an in-process call that uses every core, and under load each instance keeps its own share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeserve.backends.base import Instance
from pipeserve.server.repository.model_settings import InstanceGroupSettings

log = logging.getLogger("pipeserve.scheduler")

# torch's thread count before any instance set its own (read at import, in the importing thread).
_PROCESS_THREADS = torch.get_num_threads()


def plan_devices(groups: Sequence[InstanceGroupSettings]) -> list[torch.device]:
    """Expands instance groups into one device per instance (count x kind x gpus)."""
    if not groups:
        groups = [InstanceGroupSettings()]
    have_cuda = torch.cuda.is_available()
    devices: list[torch.device] = []
    for group in groups:
        kind = group.kind
        if kind == "auto":
            kind = "gpu" if have_cuda else "cpu"
        if kind == "cpu":
            devices += [torch.device("cpu")] * group.count
            continue
        if not have_cuda:
            raise RuntimeError("instance_group asks for KIND_GPU but no CUDA device is visible")
        visible = torch.cuda.device_count()
        gpus = list(group.gpus) or list(range(visible))
        for gpu in gpus:
            if gpu >= visible:
                raise RuntimeError(f"instance_group asks for GPU {gpu} but only {visible} are visible")
            devices += [torch.device("cuda", gpu)] * group.count
    return devices


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# backend_parameters key that sets each CPU instance's intra-op threads (Triton's PyTorch backend
# has the same knob); without it the cores are split evenly among the model's CPU instances.
INTRA_OP_THREADS = "intra_op_threads"


def lone_instance_threads(cpu_instances: int, threads: int, requested: str = "", cores: int | None = None) -> int:
    """The threads one CPU instance may take while the others idle: all of their shares (at most
    the cores), unless the config fixed each instance's count (then 0: never more than that)."""
    if requested or cpu_instances < 2:
        return 0
    cores = available_cores() if cores is None else cores
    return min(cores, threads * cpu_instances)


def cpu_threads_per_instance(cpu_instances: int, cores: int | None = None, requested: str = "") -> int:
    """Splits the cores among CPU instances so that together they do not oversubscribe them, or
    takes the count the config asks for."""
    if requested:
        if not requested.isdigit() or int(requested) < 1:
            raise ValueError(f"backend_parameters.{INTRA_OP_THREADS} must be a whole number >= 1, got {requested!r}")
        return int(requested)
    cores = available_cores() if cores is None else cores
    return max(1, cores // max(1, cpu_instances))


class InstanceWorker(concurrent.futures.Executor):
    """The one thread that runs an instance's batches, in order, and hands each result back to the
    event loop. Lighter than a ThreadPoolExecutor on the hot path (`post`: one queue put and one
    call_soon_threadsafe); `submit` makes it an Executor for other work that must run on this
    thread (reloading the instance)."""

    def __init__(self, name: str, setup: Callable[[], None]):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._setup = setup
        self._set_up = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._set_up.wait()

    def post(self, loop: asyncio.AbstractEventLoop, job: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Runs job() in the worker, then done(result) on `loop`. `job` must not raise."""
        self._jobs.put((loop, job, done))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._jobs.put((None, job, None))
        return future

    def _main(self) -> None:
        try:
            self._setup()
        finally:
            self._set_up.set()
        while True:
            task = self._jobs.get()
            if task is None:
                return
            loop, job, done = task
            result = job()
            if loop is None:
                continue
            try:
                loop.call_soon_threadsafe(done, result)
            except RuntimeError:  # the loop closed while the batch ran: nobody is waiting
                log.debug("event loop closed before a batch finished")

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()


class ModelInstance:
    """A backend instance, its worker thread, and how much work it holds.

    `state` is "ready", "restarting" (it died and a replacement is loading: work waits for it) or
    "dead" (the replacement failed too); only a ready instance whose backend says ready gets work.
    """

    def __init__(self, index: int, backend_instance: Instance, threads: int):
        self.index = index
        self.backend_instance = backend_instance
        # This instance's share of the cores; `_threads_now` is what its worker thread uses now.
        self.threads = threads
        self._threads_now = threads
        self.state = "ready"
        # Batches handed to this instance and not finished yet.
        self.outstanding = 0
        # torch.set_num_threads also changes the count that threads started later begin with;
        # put that back so that this instance's share does not leak into other components' threads.
        self.worker = InstanceWorker(f"instance-{index}-{self.device}", self._setup_thread)
        torch.set_num_threads(_PROCESS_THREADS)
        try:
            self.worker.submit(backend_instance.warm_up).result()
        except BaseException:
            self.worker.shutdown(wait=True)
            raise

    def _setup_thread(self) -> None:
        # torch's intra-op thread count is per calling thread: this worker takes its share of cores.
        # A thread takes the process-wide count on its first torch call, overwriting any count
        # set before it; so that first call comes here, before setting this worker's own.
        torch.get_num_threads()
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @property
    def device(self) -> torch.device:
        return self.backend_instance.device

    def use_threads(self, threads: int) -> None:
        """In the worker thread, before a batch: the intra-op threads the batch runs on. (This also
        sets the count that threads started later begin with; ModelInstance and other components
        set their own, so a worker's choice stays its own.)"""
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads

    @property
    def executor(self) -> concurrent.futures.Executor:
        """Runs other work (a reload) on this instance's thread, between its batches."""
        return self.worker

    def ready(self) -> bool:
        return self.state == "ready" and self.backend_instance.ready()

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.backend_instance.close()


class InstancePool:
    """The instances of one model version; picks the ready instance with the least work."""

    def __init__(self, instances: list[ModelInstance], max_outstanding: int = 1, lone_threads: int = 0):
        self.instances = instances
        # One batch per instance at a time: the next batch keeps filling while this one runs,
        # which is what makes batches large under load.
        self.max_outstanding = max_outstanding
        # Threads a CPU instance takes while the model's other CPU instances are idle (0: always
        # its own share, as when the config sets intra_op_threads).
        self.lone_threads = lone_threads

    def threads_for(self, instance: ModelInstance) -> int:
        """The intra-op threads for the batch `instance` is about to run: every CPU instance's share
        when the others have nothing to do (their cores would idle), else its own."""
        if self.lone_threads <= instance.threads or instance.device.type != "cpu":
            return instance.threads
        for other in self.instances:
            if other is not instance and other.outstanding and other.device.type == "cpu":
                return instance.threads
        return self.lone_threads

    def pick(self) -> ModelInstance | None:
        """The least busy ready instance with room for a batch, or None."""
        best = None
        for inst in self.instances:
            if inst.outstanding < self.max_outstanding and (best is None or inst.outstanding < best.outstanding):
                if inst.ready():
                    best = inst
        return best

    def any_ready(self) -> bool:
        return any(inst.ready() for inst in self.instances)

    def may_serve(self) -> bool:
        """True while some instance is ready or coming back (restarting): queued work may wait."""
        return any(inst.state == "restarting" or inst.ready() for inst in self.instances)

    def close(self) -> None:
        for inst in self.instances:
            inst.close()
