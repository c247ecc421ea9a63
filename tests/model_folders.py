"""Builds small temporary model repositories from the default one, without copying weights.

A model folder here is a real folder (the repository refuses model folders that are symlinks
leading out of it) whose files are symlinks to a default model's files, plus a config.pbtxt
written by the test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import REPOSITORY


def link_files(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.pbtxt" and not item.name.startswith("."):
            (folder / item.name).symlink_to(item.resolve())


def write_config(folder: Path, name: str, task: str = "text-classification", extra: str = "") -> None:
    (folder / "config.pbtxt").write_text(f'name: "{name}"\ntask: "{task}"\nbackend: "eager"\n{extra}\n')


def add_model(repo: Path, name: str, source: str = "tiny-classifier", *, task: str = "text-classification",
              versions: tuple[int, ...] = (), extra: str = "") -> Path:
    """<repo>/<name>/ with config.pbtxt and the files of model_repository/<source>, either
    unversioned or in the numbered version folders given."""
    folder = repo / name
    folder.mkdir(parents=True)
    for version in versions:
        link_files(REPOSITORY / source, folder / str(version))
    if not versions:
        link_files(REPOSITORY / source, folder)
    write_config(folder, name, task, extra)
    return folder


def remove_model(repo: Path, name: str) -> None:
    shutil.rmtree(repo / name)
