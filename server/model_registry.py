"""The models being served: loading from the repository, versions, and which model answers a request."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from pipeserve.backends.registry import backend_names
from pipeserve.server.errors import (
    InvalidArgument,
    ModelControlDisabled,
    ModelLoadFailed,
    ModelNotFound,
    ModelNotReady,
    PipeserveError,
    WrongTask,
)
from pipeserve.server.repository.config import is_valid_model_name
from pipeserve.server.repository.model_settings import ModelSettings
from pipeserve.server.repository.repository import ModelRepository
from pipeserve.server.served_model import ServedModel
from pipeserve.server.tasks.registry import canonical_task_name, task_names

log = logging.getLogger("pipeserve.models")


@dataclass
class ModelStatus:
    """A model version's state as listings show it: LOADING, READY, UNLOADING, UNAVAILABLE, FAILED."""

    name: str
    version: int
    state: str
    reason: str = ""
    task: str = ""
    backend: str = ""


CONTROL_MODES = ("none", "explicit", "poll")


class ModelRegistry:
    def __init__(self, repository: ModelRepository, control_mode: str = "explicit"):
        if control_mode not in CONTROL_MODES:
            raise ValueError(f"model_control_mode: {control_mode!r} is unknown; allowed: {', '.join(CONTROL_MODES)}")
        self.repository = repository
        # "none": the models loaded at start are all there is; "explicit" and "poll" also take
        # load and unload requests (poll follows the repository as well, see model_control.py).
        self.control_mode = control_mode
        self.served: dict[str, dict[int, ServedModel]] = {}
        self.settings: dict[str, ModelSettings] = {}
        self.status: dict[tuple[str, int], ModelStatus] = {}
        # What each loaded version's folder held when it was loaded, to tell changed versions.
        self._fingerprints: dict[tuple[str, int], tuple] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # True once the models named at start have been tried (server readiness).
        self.started = False
        # Models with a load in progress or waiting to load at start, by name: their task where
        # known (calls for them get UNAVAILABLE, a retry will do; see lifecycle_error).
        self.loading: dict[str, str] = {}
        self._loads_in_progress: Counter[str] = Counter()
        # Called with (event, ServedModel) on "loaded" / "unloaded" (metrics, health).
        self.listeners: list[Callable[[str, ServedModel], None]] = []

    # -- loading ------------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        """Loads every model of the repository (or those named); one failure does not stop the rest.
        Until each has been tried, calls for it (or its task) get UNAVAILABLE, not NOT_FOUND."""
        names = list(names if names is not None else self.repository.model_names())
        for name in names:
            self._begin_loading(name)
        try:
            for name in names:
                try:
                    await self.load(name)
                except PipeserveError as exc:
                    log.error("model %s failed to load: %s", name, exc.message)
                except Exception:
                    log.exception("model %s failed to load", name)
                finally:
                    self._end_loading(name)
        finally:
            self.started = True

    def require_control(self) -> None:
        """Refuses load and unload requests when the server runs with --model-control-mode none."""
        if self.control_mode == "none":
            raise ModelControlDisabled(
                "model control is off (--model-control-mode none): models load only at start; restart the server "
                "with --model-control-mode explicit or poll to load and unload models at run time")

    async def load(self, name: str, *, reuse_unchanged: bool = False) -> list[ModelStatus]:
        """Loads or reloads a model's selected versions. A failed load leaves what served before serving.

        With `reuse_unchanged` (the repository poller), a version whose folder and config did not
        change since it was loaded keeps serving as it is instead of being loaded again.
        """
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._begin_loading(name)
        try:
            async with lock:
                return await self._load(name, reuse_unchanged)
        finally:
            self._end_loading(name)

    def _begin_loading(self, name: str) -> None:
        self._loads_in_progress[name] += 1
        task = self._task_on_disk(name)
        if task is not None:
            self.loading.setdefault(name, task)

    def _end_loading(self, name: str) -> None:
        self._loads_in_progress[name] -= 1
        if self._loads_in_progress[name] <= 0:
            del self._loads_in_progress[name]
            self.loading.pop(name, None)

    async def _load(self, name: str, reuse_unchanged: bool) -> list[ModelStatus]:
        previous = self.served.get(name, {})
        try:
            config, path = self.repository.read_settings(name, task_names(), backend_names())
            sources = self.repository.version_sources(name, config, path)
        except ModelNotFound:
            raise
        except PipeserveError as exc:
            keep = "; the previous version keeps serving" if previous else ""
            self.status[(name, 0)] = ModelStatus(name, 0, "FAILED", exc.message + keep,
                                                 getattr(exc, "task", ""), getattr(exc, "backend", ""))
            raise
        self.status.pop((name, 0), None)
        same_config = self.settings.get(name) == config
        loaded: dict[int, ServedModel] = {}
        fingerprints: dict[int, tuple] = {}
        for source in sources:
            key = (name, source.version)
            fingerprints[source.version] = await asyncio.to_thread(self.repository.fingerprint, source.folder)
            old = previous.get(source.version)
            unchanged = same_config and self._fingerprints.get(key) == fingerprints[source.version]
            if reuse_unchanged and old is not None and unchanged:
                loaded[source.version] = old
                continue
            self.status[key] = ModelStatus(name, source.version, "LOADING", "", config.task, config.backend)
            try:
                loaded[source.version] = await ServedModel.load(config, source)
            except Exception as exc:
                reason = exc.message if isinstance(exc, PipeserveError) else f"{type(exc).__name__}: {exc}"
                log.error("model %s version %d failed to load: %s", name, source.version, reason)
                # All or nothing: versions loaded before this one go again; what served before stays.
                for version, served in loaded.items():
                    if previous.get(version) is not served:
                        await served.close()
                        if version not in previous:
                            self.status[(name, version)] = ModelStatus(
                                name, version, "UNAVAILABLE", f"version {source.version} failed to load", config.task,
                                config.backend)
                keep = "; the previous version keeps serving" if previous else ""
                self.status[key] = ModelStatus(name, source.version, "FAILED", reason + keep, config.task,
                                               config.backend)
                for version in previous:
                    self.status[(name, version)].state = "READY"
                raise ModelLoadFailed(f"model {name} version {source.version} failed to load: {reason}{keep}") from exc
        self.served[name] = loaded
        self.settings[name] = config
        for key in [k for k, st in self.status.items() if k[0] == name and k[1] not in loaded
                    and st.state in ("FAILED", "LOADING")]:
            del self.status[key]
        for version, served in loaded.items():
            self._fingerprints[(name, version)] = fingerprints[version]
            self.status[(name, version)] = ModelStatus(name, version, "READY", "", config.task, config.backend)
            if previous.get(version) is not served:
                self._notify("loaded", served)
        # Versions that the new load replaced finish their in-flight work, then go.
        for version, old in previous.items():
            if version not in loaded or loaded[version] is not old:
                if version not in loaded:
                    self._fingerprints.pop((name, version), None)
                await self._retire(old, keep_status=version in loaded)
        log.info("model %s ready (versions %s, task %s, backend %s)", name, sorted(loaded), config.task, config.backend)
        return [self.status[(name, v)] for v in sorted(loaded)]

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            versions = self.served.pop(name, None)
            if versions is None:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(sorted(self.served)) or 'none'}")
            self.settings.pop(name, None)
            for version, served in versions.items():
                self._fingerprints.pop((name, version), None)
                await self._retire(served, keep_status=False)

    async def _retire(self, served: ServedModel, keep_status: bool) -> None:
        key = (served.name, served.version)
        if not keep_status:
            self.status[key] = ModelStatus(served.name, served.version, "UNLOADING", "", served.settings.task, served.settings.backend)
        await served.close()
        self._notify("unloaded", served)
        if not keep_status:
            self.status[key].state = "UNAVAILABLE"

    async def close(self) -> None:
        for name in list(self.served):
            await self.unload(name)

    def _notify(self, event: str, served: ServedModel) -> None:
        for listener in self.listeners:
            listener(event, served)

    # -- resolving a request's model ------------------------------------------------------------

    def all_served(self) -> list[ServedModel]:
        return [m for versions in self.served.values() for m in versions.values()]

    def get(self, name: str, version: int = 0) -> ServedModel:
        """A loaded model version (0: the newest). What is not served gets the status of its state
        (see `lifecycle_error`): UNAVAILABLE while loading, FAILED_PRECONDITION after a failed
        load, NOT_FOUND only for what the repository does not hold."""
        versions = self.served.get(name)
        if not versions:
            raise self.lifecycle_error(name)
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise self.lifecycle_error(name, version)
        return versions[version]

    def lifecycle_error(self, name: str, version: int = 0) -> PipeserveError:
        """Why `name` (version `version`; 0: any) does not answer now, as the status a client
        should see: whether a retry will do is the status's to say."""
        if not is_valid_model_name(name):
            return InvalidArgument("model", f"{name!r} is not a valid model name (letters, digits, '_', '.', '-'; "
                                            "no path separators or '..')")
        what = f"model {name!r}" + (f" version {version}" if version else "")
        state = self.status.get((name, version)) if version else None
        if name in self.loading or (state is not None and state.state == "LOADING"):
            return ModelNotReady(f"{what} is loading; retry shortly")
        failed = state if state is not None and state.state == "FAILED" else None
        if failed is None and not self.served.get(name):
            failed = next((s for (n, _), s in sorted(self.status.items()) if n == name and s.state == "FAILED"), None)
        if failed is not None:
            return ModelLoadFailed(f"{what} failed to load: {failed.reason}")
        unloading = state.state == "UNLOADING" if state is not None else any(
            n == name and s.state == "UNLOADING" for (n, _), s in self.status.items())
        if unloading:
            return ModelNotReady(f"{what} is unloading; retry shortly (it may be reloading) or call another model")
        versions = self.served.get(name)
        if versions and version:
            return ModelNotFound(f"model {name!r} has no version {version}; versions: {sorted(versions)}")
        if self._task_on_disk(name) is not None:
            if self.control_mode == "poll":
                return ModelNotReady(f"{what} is in the repository and loads at the next repository poll; retry shortly")
            return ModelLoadFailed(f"{what} is in the repository but not loaded; load it (ModelService.LoadModel or "
                                   "KServe RepositoryModelLoad)")
        known = sorted(self.served)
        return ModelNotFound(f"model {name!r} is not served; models: {', '.join(known) or 'none'}")

    def _task_on_disk(self, name: str) -> str | None:
        """The task a model of the repository names (canonical; "" where its config cannot say), or
        None where the repository does not hold `name`."""
        if not is_valid_model_name(name):
            return None
        try:
            settings, _ = self.repository.read_settings(name, task_names(), backend_names())
        except ModelNotFound:
            return None
        except PipeserveError as exc:
            return canonical_task_name(getattr(exc, "task", "")) or ""
        return canonical_task_name(settings.task) or settings.task

    def resolve(self, task: str, name: str = "", version: int = 0) -> ServedModel:
        """The model that answers a request for `task`: the one named, or the task's default."""
        canonical = canonical_task_name(task) or task
        if not name:
            return self.default_for(canonical)
        served = self.get(name, version)
        if served.task_name != canonical:
            raise WrongTask(
                f"model {name!r} serves {served.task_name!r}, not {task!r}; call the {served.task_name} service "
                f"or pick a {task} model"
            )
        return served

    def default_for(self, task: str) -> ServedModel:
        candidates = sorted(
            (m for m in self.all_served() if m.task_name == task),
            key=lambda m: (not m.settings.default_for_task, m.name, -m.version),
        )
        if not candidates:
            raise self._no_model_for(task)
        return candidates[0]

    def _no_model_for(self, task: str) -> PipeserveError:
        """Why no model answers `task`: one of the repository's is loading (UNAVAILABLE), failed or
        is not loaded (FAILED_PRECONDITION), or none serves it (NOT_FOUND)."""
        if any(t == task for t in self.loading.values()):
            return ModelNotReady(f"the model for task {task!r} is loading; retry shortly")
        held = [name for name in self.repository.model_names() if self._task_on_disk(name) == task]
        if held:
            errors = [self.lifecycle_error(name) for name in held]
            retryable = [e for e in errors if isinstance(e, ModelNotReady)]
            first = (retryable or errors)[0]
            return type(first)(f"no model serving task {task!r} is ready: {first.message}")
        return ModelNotFound(f"no model serves task {task!r}; name a model or add one to the repository")
