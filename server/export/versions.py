"""Writing an export into a repository: a new numbered version folder, written whole or not at all.

An export never changes the model it came from. `config.pbtxt` names one backend for every version
of a model (as Triton's `platform` does), so a TorchScript version inside an eager model would
need the whole model switched to TorchScript and would strand its eager version. The export is
therefore a sibling model, `<model>-torchscript`, with its own config; each export adds version
n+1 there (`version_policy` picks which serve, as for any model), and the eager model keeps
serving beside it, which makes comparing the two a matter of naming the model in a request.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeserve.server.repository.config import (
    CONFIG_FILE,
    is_valid_model_name,
    read_model_config_fields,
    write_model_config,
)


def version_numbers(model_folder: Path) -> list[int]:
    if not model_folder.is_dir():
        return []
    return sorted(int(p.name) for p in model_folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def add_version(model_folder: Path, write: Callable[[Path], None]) -> tuple[int, Path]:
    """Writes version max+1 of `model_folder` through `write(folder)`; returns (version, folder).

    The files go to a hidden partial folder (the repository and its poller ignore dot-names) that
    is renamed into place when complete, so a server never sees half a version; a concurrent
    export that takes the number first makes this one take the next.
    """
    model_folder.mkdir(parents=True, exist_ok=True)
    partial = model_folder / f".export.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        for _ in range(100):
            version = max(version_numbers(model_folder), default=0) + 1
            final = model_folder / str(version)
            try:
                os.rename(partial, final)  # fails if another export created `final` meanwhile
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or final.exists():
                    continue
                raise
            return version, final
        raise RuntimeError(f"could not find a free version number in {model_folder}")
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def sibling_config(source: Mapping[str, Any], name: str, backend: str) -> dict[str, Any]:
    """The serving config of an exported model: the source's config.pbtxt fields (as
    `read_model_config_fields` gives them), under its own name and backend.

    It never takes over the task's default (the eager model keeps it); weights-loading settings
    (source, backend_parameters) and the source's version policy do not apply to the export.
    """
    fields = {key: copy.deepcopy(value) for key, value in source.items()
              if key not in ("source", "backend_parameters", "version_policy")}
    fields.update(name=name, backend=backend, default_for_task=False)
    return fields


def has_model_config(model_folder: Path, backend: str) -> bool:
    """True if the model already has a config.pbtxt (kept: a user may have tuned it). One for
    another backend is an error, checked before anything is written: the export would not serve."""
    path = model_folder / CONFIG_FILE
    if not path.is_file():
        return False
    existing = read_model_config_fields(path).get("backend") or "eager"
    if existing != backend:
        raise ValueError(f"{path} serves with backend {existing!r}, not {backend!r}; "
                         "export under another --name or fix that config")
    return True


def write_config(model_folder: Path, fields: Mapping[str, Any]) -> Path:
    """Writes config.pbtxt from its fields, after the version folders: a polling server then sees a
    whole model (and write_model_config renames the file into place whole)."""
    name = fields.get("name", "")
    if not is_valid_model_name(name):
        raise ValueError(f"model name {name!r} is not valid (letters, digits, '_', '.', '-')")
    model_folder.mkdir(parents=True, exist_ok=True)
    return write_model_config(model_folder, fields)
