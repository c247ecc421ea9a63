"""Finds tasks through the ``pipeserve.tasks`` entry-point group, with their aliases.

A third party registers a task (often a subclass of a built-in one) from its own package:

    [project.entry-points."pipeserve.tasks"]
    my-task = "my_package.tasks:MyTask"
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import entry_points

from pipeserve.server.tasks.base import Task

ENTRY_POINT_GROUP = "pipeserve.tasks"

# transformers accepts "translation_en_to_fr"; it is the translation task with languages set.
_TRANSLATION_PAIR = re.compile(r"^translation_([A-Za-z_\-]+)_to_([A-Za-z_\-]+)$")


@functools.cache
def _registry() -> tuple[dict[str, type[Task]], dict[str, str]]:
    """(registered name -> class, alias -> registered name)."""
    classes: dict[str, type[Task]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"entry point {ep.value} for task {ep.name!r} is not a pipeserve Task subclass")
        classes[ep.name] = cls
    # Aliases count only for the class registered under its own name, so that a subclass
    # registered under a new name does not inherit (and steal) its parent's aliases.
    aliases = {alias: name for name, cls in classes.items() if cls.name == name for alias in cls.aliases}
    return classes, aliases


def refresh() -> None:
    """Forgets the cached entry points (after installing a plugin at run time, as tests do)."""
    _registry.cache_clear()


def task_names() -> set[str]:
    """Every name a config or request may use, aliases included."""
    classes, aliases = _registry()
    return set(classes) | set(aliases)


def canonical_task_name(name: str) -> str | None:
    """The registered name a task name or alias stands for, or None."""
    classes, aliases = _registry()
    if name in classes:
        return name
    if name in aliases:
        return aliases[name]
    if _TRANSLATION_PAIR.match(name) and "translation" in classes:
        return "translation"
    return None


def task_class(name: str) -> type[Task]:
    canonical = canonical_task_name(name)
    if canonical is None:
        raise KeyError(name)
    return _registry()[0][canonical]


def translation_languages(name: str) -> tuple[str, str] | None:
    """('en', 'fr') for 'translation_en_to_fr', else None."""
    match = _TRANSLATION_PAIR.match(name)
    return (match.group(1), match.group(2)) if match else None
