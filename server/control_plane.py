"""The control plane: model management for every protocol adapter, as the data plane is for inference.

pipeserve.v1.ModelService and KServe v2's health, metadata, repository and statistics calls turn
their messages into these calls and the answers back into messages; this module is the only one
that reads the registry for them. Like the DataPlane, it knows no protocol: it answers with the
typed values below, and typed errors (`ModelNotFound`, `ModelControlDisabled`, ...).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeserve.backends.registry import backend_names
from pipeserve.server.dataplane import CallGate
from pipeserve.server.errors import ConfigError, InvalidArgument, ModelNotFound, PipeserveError
from pipeserve.server.model_registry import ModelRegistry, ModelStatus
from pipeserve.server.repository.model_settings import ModelSettings, frozen_mapping
from pipeserve.server.scheduling.stats import ModelStats
from pipeserve.server.served_model import ServedModel
from pipeserve.server.tasks.registry import task_names

# ConfigError fields of a config.pbtxt that cannot be parsed at all (repository/config.py).
UNREADABLE_CONFIG = ("(file)", "(syntax)")


@dataclass(frozen=True)
class ModelDescription:
    """What the wire adapters (and KServe's codecs) know of one loaded model version, built once
    per loaded version: a reloaded version has a new one."""

    name: str
    version: int
    # The canonical task name, and the task's class: a v2 codec is found through its bases.
    task_name: str
    task_class: type
    settings: ModelSettings
    # Request parameter defaults (config.pbtxt parameters.defaults, as the task parses them).
    defaults: Mapping[str, Any]
    # The key of each result of a text-to-text task ("summary_text", "translation_text").
    result_key: str
    # The model's hidden size (the length of an embedding); 0 where its config does not say.
    hidden_size: int
    # One request, many responses: the task runs on the generation runtime (token streaming).
    streams: bool


@dataclass(frozen=True)
class VersionState:
    """A model version's line in a listing. `state`: LOADING, READY, UNLOADING, UNAVAILABLE or
    FAILED; version 0 stands for the whole model where its config failed before any version."""

    name: str
    version: int
    state: str
    reason: str
    task: str
    backend: str
    default_for_task: bool


@dataclass(frozen=True)
class ModelEntry:
    """A model of the repository: its settings (the loaded ones, else its config.pbtxt's) and its
    versions' states. `settings` is None where the config does not validate; `config_error` says why."""

    name: str
    settings: ModelSettings | None
    versions: tuple[VersionState, ...]
    config_error: ConfigError | None = None


@dataclass(frozen=True)
class VersionStatistics:
    """One loaded version's counters (live: read them when answering)."""

    name: str
    version: int
    stats: ModelStats


class ControlPlane:
    """Model management: readiness, descriptions of loaded models, the repository's index, loading
    and unloading, statistics."""

    def __init__(self, registry: ModelRegistry, gate: CallGate):
        self.registry = registry
        # The data plane's gate: once the server drains, nothing is ready any more.
        self.gate = gate
        self._descriptions: weakref.WeakKeyDictionary[ServedModel, ModelDescription] = weakref.WeakKeyDictionary()

    # -- readiness --------------------------------------------------------------------------------

    def server_ready(self) -> bool:
        """True once the models named at start have been tried, until the server drains."""
        return self.registry.started and not self.gate.draining

    def model_ready(self, name: str, version: int = 0) -> bool:
        """True where the version (0: the newest) is loaded, an instance takes work, and the server
        does not drain; False for a model that is not served."""
        try:
            served = self.registry.get(name, version)
        except PipeserveError:
            return False
        return served.ready() and not self.gate.draining

    # -- loaded models ------------------------------------------------------------------------------

    def describe(self, name: str, version: int = 0) -> ModelDescription:
        """A loaded version (0: the newest); NOT_FOUND names the models or versions that exist."""
        served = self.registry.get(name, version)
        found = self._descriptions.get(served)
        if found is None:
            found = self._descriptions[served] = _description(served)
        return found

    def describe_for_task(self, task: str, name: str = "", version: int = 0) -> ModelDescription:
        """The model that answers `task` (the one named, or the task's default), as the data plane
        would pick it; the same statuses where none does."""
        served = self.registry.resolve(task, name, version)
        return self.describe(served.name, served.version)

    def served_versions(self, name: str) -> list[int]:
        """The loaded versions of a model, oldest first."""
        return sorted(self.registry.served.get(name, {}))

    def statistics(self, name: str = "", version: int = 0) -> list[VersionStatistics]:
        """Every loaded version's counters, those of a model's versions, or of one version."""
        if not name:
            models = self.registry.all_served()
        elif version:
            models = [self.registry.get(name, version)]
        else:
            self.registry.get(name)  # NOT_FOUND names the models that exist
            models = list(self.registry.served[name].values())
        return [VersionStatistics(m.name, m.version, m.stats) for m in models]

    # -- the repository -------------------------------------------------------------------------------

    @property
    def repository_name(self) -> str:
        return self.registry.repository.root.name

    def check_repository(self, name: str) -> None:
        """The server has one repository: an empty name or its folder's name."""
        if name and name != self.repository_name:
            raise ModelNotFound(f"repository {name!r} is not served; the server has one repository, "
                                f"{self.repository_name!r} (or send an empty name)")

    def versions(self, name: str | None = None, *, ready_only: bool = False) -> list[VersionState]:
        """The versions with a state (of one model, or all), by name and version."""
        return [self._state(s) for key, s in sorted(self.registry.status.items())
                if (name is None or key[0] == name) and (not ready_only or s.state == "READY")]

    def index(self) -> list[tuple[str, list[VersionState]]]:
        """Every model of the repository or with a state, by name, with its versions' states (none:
        never loaded)."""
        states = self.versions()
        names = sorted(set(self.registry.repository.model_names()) | {s.name for s in states})
        return [(name, [s for s in states if s.name == name]) for name in names]

    def model(self, name: str) -> ModelEntry:
        """A model's settings and versions. A config.pbtxt that does not parse raises its ConfigError;
        one that parses but does not validate is reported in the entry."""
        self.registry.repository.model_folder(name)  # NOT_FOUND for names outside the repository
        settings = self.registry.settings.get(name)
        error = None
        if settings is None:
            try:
                settings, _ = self.registry.repository.read_settings(name, task_names(), backend_names())
            except ConfigError as exc:
                if exc.field in UNREADABLE_CONFIG:
                    raise
                error = exc
        return ModelEntry(name, settings, tuple(self.versions(name)), error)

    async def load(self, name: str, *, repository: str = "", overrides: Iterable[str] = ()) -> list[VersionState]:
        """Loads (or reloads) a model from its folder; its selected versions' states. `overrides`
        names what a request wanted to put in place of config.pbtxt or files: refused."""
        self.registry.require_control()
        self.check_repository(repository)
        for key in overrides:
            raise InvalidArgument(f"parameters.{key}", "overriding config.pbtxt or files in a load request is not "
                                  "supported; change the model's folder in the repository and load it again")
        return [self._state(s) for s in await self.registry.load(name)]

    async def unload(self, name: str, *, repository: str = "", not_loaded_ok: bool = False) -> None:
        """Stops serving a model once its calls in flight finish. NOT_FOUND where it is not loaded,
        unless `not_loaded_ok` and it is a model of the repository (then nothing is to do)."""
        self.registry.require_control()
        self.check_repository(repository)
        try:
            await self.registry.unload(name)
        except ModelNotFound:
            if not (not_loaded_ok and name in self.registry.repository.model_names()):
                raise

    def _state(self, status: ModelStatus) -> VersionState:
        settings = self.registry.settings.get(status.name)
        return VersionState(status.name, status.version, status.state, status.reason, status.task, status.backend,
                            bool(settings and settings.default_for_task))


def _description(served: ServedModel) -> ModelDescription:
    task = served.task
    hf_config = task.context.hf_config
    return ModelDescription(
        name=served.name,
        version=served.version,
        task_name=served.task_name,
        task_class=type(task),
        settings=served.settings,
        defaults=frozen_mapping(task.defaults()),
        # Only text-to-text tasks name their results' key; the others return transformers' shapes.
        result_key=getattr(task, "result_key", "generated_text"),
        hidden_size=int(getattr(hf_config, "hidden_size", 0) or 0),
        streams=task.kind == "generation",
    )
