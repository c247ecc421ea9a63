"""Finds backend plugins through the ``pipeserve.backends`` entry-point group."""

from __future__ import annotations

from importlib.metadata import entry_points

from pipeserve.backends.base import Backend

ENTRY_POINT_GROUP = "pipeserve.backends"


def available_backends() -> dict[str, type[Backend]]:
    """Every installed backend by name. Loading is lazy: importing a backend happens here."""
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep  # type: ignore[assignment]
    return found


def backend_names() -> set[str]:
    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def create_backend(name: str) -> Backend:
    """Instantiates the backend registered as `name`."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise TypeError(f"entry point {ep.value} for backend {name!r} is not a pipeserve Backend subclass")
            return cls()
    raise KeyError(name)
