"""Building the default repository: each model whole or not at all, stamped with the builder's version.

Each model is built in a hidden partial folder next to its final place and renamed into place
once complete, so a crash never leaves a half-written model. The partial folder's name carries
the building process's id: a concurrent build leaves it alone, a later build removes what a dead
one left. A model folder records the builder version that made it (STAMP_FILE); one that the
current builder made is skipped unless `force`, one an older builder made (stamp missing or
lower) is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeserve.model_builder.catalogue import CatalogueEntry, select
from pipeserve.server.repository.config import CONFIG_FILE, write_model_config

# Raise it with any change to what the builder writes (weights, tokenizers, configs): repositories
# built before then are rebuilt by the next `pipeserve models init` (and `make run`, `make test`).
# Folders from before the stamp existed count as version 0.
# 2: the T5 Unigram vocabulary in one order in every build.
# 3: sentiment is all-MiniLM-L6-v2 with a head trained on generated sentences (model_builder/sentiment.py).
# 4: gpt2-chat, gpt2 with a chat template.
BUILDER_VERSION = 4
# In each model folder, not the repository root: `only` builds some models, bench builds others,
# and a repository may hold models of its own. Hidden, so the server and exports ignore it.
STAMP_FILE = ".pipeserve-builder"
WEIGHTS_SEED = 0

ProgressFn = Callable[[str, int, int], None]

_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[^/]+$")


def build_entry(entry: CatalogueEntry, folder: Path) -> None:
    """Writes the model files, the stamp and then config.pbtxt (last) into `folder`, creating it.

    `torch.manual_seed(WEIGHTS_SEED)` runs first so that the random weights are the same on every
    build. The config's name is the entry's name whatever the folder is called, so a build may
    write into a temporary folder that is renamed afterwards.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(WEIGHTS_SEED)
    with _quiet_transformers():
        entry.make_files(folder)
    _check_weights(folder)
    (folder / STAMP_FILE).write_text(f"{BUILDER_VERSION}\n", encoding="utf-8")
    write_model_config(folder, {**entry.serving_config, "name": entry.name})
    _normalize_permissions(folder)


def built_version(folder: Path) -> int:
    """The builder version that made the model in `folder`: 0 without (or with a garbled) stamp."""
    try:
        return int((Path(folder) / STAMP_FILE).read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return 0


def is_current(folder: Path) -> bool:
    """True for a complete model that this builder (or a newer one) made."""
    return (folder / CONFIG_FILE).is_file() and built_version(folder) >= BUILDER_VERSION


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hides transformers' per-file progress bars ("Writing model shards") during a build."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_weights(folder: Path) -> None:
    """Weights must be safetensors: a pickled .bin file is never served from our repository."""
    pickled = sorted(p.name for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"})
    if pickled:
        raise RuntimeError(f"{folder}: pickled weight files written: {pickled}")
    if not any(folder.glob("*.safetensors")):
        raise RuntimeError(f"{folder}: no .safetensors weights written")


def _normalize_permissions(folder: Path) -> None:
    """Gives the files the permissions a plain write would (umask applied): transformers writes
    model.safetensors 0600 and mkdtemp makes 0700 folders, which a server running as another
    user could not read."""
    umask = _current_umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _current_umask() -> int:
    # /proc/self/status has it without the process-wide os.umask(0) dance (racy with threads).
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(repo: Path) -> None:
    """Removes partial folders that a crashed build (a process no longer running) left behind."""
    for entry in repo.iterdir():
        match = _PARTIAL_RE.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _partial_folder(repo: Path, name: str, kind: str = "partial") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f".{name}.{kind}-{os.getpid()}-", dir=repo))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _build_one(entry: CatalogueEntry, repo: Path, force: bool) -> bool:
    """Builds one model into place; False when another process finished it first."""
    target = repo / entry.name
    with _partial_folder(repo, entry.name) as partial:
        build_entry(entry, partial)
        if target.exists():
            if is_current(target) and not force:
                return False  # a concurrent build put it there; ours is the same
            # Swap the old folder out, the new one in, then delete the old one.
            with _partial_folder(repo, entry.name, "old") as old:
                os.replace(target, old / "model")
                os.replace(partial, target)
        else:
            os.replace(partial, target)
    return True


def build_default_repository(
    repo: Path,
    progress: ProgressFn | None = None,
    only: set[str] | None = None,
    force: bool = False,
) -> list[str]:
    """Builds the default model repository under `repo`; returns the names of the models built.

    only: names to build (default: every model of DEFAULT_MODELS; names from BENCH_MODELS may be
      given too). An unknown name raises ValueError before anything is built.
    force: rebuild every model named, even those the current builder made (otherwise skipped;
      those an older builder made are always rebuilt).
    progress: called as progress(name, index, total) before each model that is built, with
      index counting from 0 (as enumerate does; show index + 1) and total the number of models
      to build (skipped ones not counted).

    A model folder that exists without config.pbtxt and is not empty is not ours to overwrite:
    FileExistsError, unless force.
    """
    repo = Path(repo)
    entries = select(only)
    repo.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(repo)

    todo = [entry for entry in entries if force or not is_current(repo / entry.name)]
    if not force:
        occupied = [entry.name for entry in todo if (repo / entry.name).exists()
                    and not (repo / entry.name / CONFIG_FILE).is_file()
                    and (not (repo / entry.name).is_dir() or any((repo / entry.name).iterdir()))]
        if occupied:
            raise FileExistsError(
                f"{repo}: {occupied} exist without {CONFIG_FILE}; remove them or build with force"
            )

    built: list[str] = []
    for index, entry in enumerate(todo):
        if progress is not None:
            progress(entry.name, index, len(todo))
        if _build_one(entry, repo, force):
            built.append(entry.name)
    return built
