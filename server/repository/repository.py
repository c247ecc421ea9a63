"""The model repository: a Triton-style folder of models.

    <repository>/<model>/config.pbtxt
    <repository>/<model>/<files>              one unversioned model (served as version 1), or
    <repository>/<model>/<version>/<files>    numbered versions, picked by the config's version_policy
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeserve.server.errors import ConfigError, InvalidArgument, ModelNotFound
from pipeserve.server.repository.config import CONFIG_FILE, is_valid_model_name, read_model_settings
from pipeserve.server.repository.model_settings import ModelSettings


@dataclass(frozen=True)
class ModelVersionSource:
    """Where one version of a model lives: its folder and what to load from it."""

    name: str
    version: int
    folder: Path
    config_path: Path
    # A local folder with weights and tokenizer, or None when the model comes from a hub id.
    local_path: Path | None
    hub_id: str
    revision: str


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def model_names(self) -> list[str]:
        """Folders holding a config.pbtxt, sorted; other folders are ignored."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file() and is_valid_model_name(p.name)
        )

    def model_folder(self, name: str) -> Path:
        """The folder of a model; names that could leave the repository are refused."""
        if not is_valid_model_name(name):
            raise InvalidArgument("model", f"{name!r} is not a valid model name (letters, digits, '_', '.', '-'; "
                                           "no path separators or '..')")
        folder = (self.root / name).resolve()
        if folder.parent != self.root or not (folder / CONFIG_FILE).is_file():
            raise ModelNotFound(f"model {name!r} is not in the repository; it has: {', '.join(self.model_names()) or 'none'}")
        return folder

    def fingerprint(self, folder: Path, depth: int = 3) -> tuple:
        """What a folder holds, as (relative path, size, mtime) of every file and folder under it
        (symlinks followed, hidden names skipped): equal fingerprints mean nothing changed."""
        entries = []

        def walk(current: Path, level: int) -> None:
            try:
                children = sorted(current.iterdir())
            except OSError:
                return
            for child in children:
                if child.name.startswith("."):
                    continue
                try:
                    st = child.stat()
                except OSError:
                    continue
                entries.append((str(child.relative_to(folder)), st.st_size, st.st_mtime_ns))
                if child.is_dir() and level < depth:
                    walk(child, level + 1)

        walk(folder, 1)
        return tuple(entries)

    def read_settings(self, name: str, known_tasks: set[str], known_backends: set[str]) -> tuple[ModelSettings, Path]:
        """A model's config.pbtxt, parsed and validated (ConfigError names the file and field)."""
        path = self.model_folder(name) / CONFIG_FILE
        return read_model_settings(path, name, known_tasks, known_backends), path

    def version_sources(self, name: str, settings: ModelSettings, config_path: Path) -> list[ModelVersionSource]:
        """The versions the config's policy selects, oldest first."""
        folder = self.model_folder(name)
        found = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)
        if not found:
            versions = {1: folder}
        else:
            policy = settings.version_policy
            if policy.kind == "all":
                chosen = found
            elif policy.kind == "specific":
                missing = [v for v in policy.versions if v not in found]
                if missing:
                    raise ConfigError(config_path, "version_policy.specific.versions", f"versions {missing} have no folder; found {found}")
                chosen = sorted(policy.versions)
            else:
                chosen = found[-policy.num_versions:]
            versions = {v: folder / str(v) for v in chosen}
        return [self._source(name, v, f, settings, config_path) for v, f in sorted(versions.items())]

    def _source(self, name: str, version: int, folder: Path, settings: ModelSettings,
                config_path: Path) -> ModelVersionSource:
        local: Path | None = None
        source = settings.source
        if not source.hub_id:
            local = (folder / source.path).resolve() if source.path else folder
            if not Path(source.path).is_absolute() and not local.is_relative_to(self.root):
                raise ConfigError(config_path, "source.path", "must stay inside the repository")
            if not local.is_dir():
                raise ConfigError(config_path, "source.path", f"folder {local} does not exist")
        return ModelVersionSource(
            name=name,
            version=version,
            folder=folder,
            config_path=config_path,
            local_path=local,
            hub_id=source.hub_id,
            revision=source.revision,
        )
