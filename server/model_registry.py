"""The models being served: loading from the repository, versions, and which model answers a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeserve.backends.registry import backend_names
from pipeserve.server.errors import ModelNotFound, ModelNotReady, PipeserveError, WrongTask
from pipeserve.server.repository.config import validate_model_config
from pipeserve.server.repository.repository import ModelRepository
from pipeserve.server.served_model import ServedModel
from pipeserve.server.tasks.registry import canonical_task_name, task_names
from pipeserve.v1.model_config_pb2 import ModelConfig

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


class ModelRegistry:
    def __init__(self, repository: ModelRepository):
        self.repository = repository
        self.served: dict[str, dict[int, ServedModel]] = {}
        self.configs: dict[str, ModelConfig] = {}
        self.status: dict[tuple[str, int], ModelStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with (event, ServedModel) on "loaded" / "unloaded" (metrics, health).
        self.listeners: list[Callable[[str, ServedModel], None]] = []

    # -- loading ------------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        """Loads every model of the repository (or those named); one failure does not stop the rest."""
        for name in names if names is not None else self.repository.model_names():
            try:
                await self.load(name)
            except PipeserveError as exc:
                log.error("model %s failed to load: %s", name, exc.message)
            except Exception:
                log.exception("model %s failed to load", name)

    async def load(self, name: str) -> list[ModelStatus]:
        """Loads or reloads a model's selected versions. A failed load leaves what served before serving."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            config, path = self.repository.read_config(name)
            try:
                config = validate_model_config(config, path, name, task_names(), backend_names())
                sources = self.repository.version_sources(name, config, path)
            except PipeserveError as exc:
                self.status[(name, 0)] = ModelStatus(name, 0, "FAILED", exc.message, config.task, config.backend)
                raise
            self.status.pop((name, 0), None)
            previous = self.served.get(name, {})
            loaded: dict[int, ServedModel] = {}
            for source in sources:
                key = (name, source.version)
                self.status[key] = ModelStatus(name, source.version, "LOADING", "", config.task, config.backend)
                try:
                    loaded[source.version] = await ServedModel.load(config, source)
                except Exception as exc:
                    reason = exc.message if isinstance(exc, PipeserveError) else f"{type(exc).__name__}: {exc}"
                    log.error("model %s version %d failed to load: %s", name, source.version, reason)
                    for served in loaded.values():
                        await served.close()
                    keep = "; the previous version keeps serving" if previous else ""
                    self.status[key] = ModelStatus(name, source.version, "FAILED", reason + keep, config.task, config.backend)
                    for version in previous:
                        self.status[(name, version)].state = "READY"
                    raise ModelNotReady(f"model {name} version {source.version} failed to load: {reason}{keep}") from exc
            self.served[name] = loaded
            self.configs[name] = config
            for version, served in loaded.items():
                self.status[(name, version)] = ModelStatus(name, version, "READY", "", config.task, config.backend)
                self._notify("loaded", served)
            # Versions that the new load replaced finish their in-flight work, then go.
            for version, old in previous.items():
                if version not in loaded or loaded[version] is not old:
                    await self._retire(old, keep_status=version in loaded)
            log.info("model %s ready (versions %s, task %s, backend %s)", name, sorted(loaded), config.task, config.backend)
            return [self.status[(name, v)] for v in sorted(loaded)]

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            versions = self.served.pop(name, None)
            if versions is None:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {', '.join(sorted(self.served)) or 'none'}")
            self.configs.pop(name, None)
            for served in versions.values():
                await self._retire(served, keep_status=False)

    async def _retire(self, served: ServedModel, keep_status: bool) -> None:
        key = (served.name, served.version)
        if not keep_status:
            self.status[key] = ModelStatus(served.name, served.version, "UNLOADING", "", served.config.task, served.config.backend)
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
        """A loaded model version (0: the newest); NOT_FOUND names what exists."""
        versions = self.served.get(name)
        if not versions:
            known = sorted(self.served)
            state = self.status.get((name, 1)) or self.status.get((name, 0))
            if state is not None and state.state == "FAILED":
                raise ModelNotReady(f"model {name!r} failed to load: {state.reason}")
            raise ModelNotFound(f"model {name!r} is not served; models: {', '.join(known) or 'none'}")
        if version == 0:
            return versions[max(versions)]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; versions: {sorted(versions)}")
        return versions[version]

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
            key=lambda m: (not m.config.default_for_task, m.name, -m.version),
        )
        if not candidates:
            raise ModelNotFound(f"no model serves task {task!r}; name a model or add one to the repository")
        return candidates[0]
