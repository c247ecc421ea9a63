"""The models being served: loading from the repository, versions, and which model answers a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pipeserve.backends.registry import backend_names
from pipeserve.server.errors import ModelControlDisabled, ModelNotFound, ModelNotReady, PipeserveError, WrongTask
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
        async with lock:
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
                    raise ModelNotReady(f"model {name} version {source.version} failed to load: {reason}{keep}") from exc
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
            key=lambda m: (not m.settings.default_for_task, m.name, -m.version),
        )
        if not candidates:
            raise ModelNotFound(f"no model serves task {task!r}; name a model or add one to the repository")
        return candidates[0]
