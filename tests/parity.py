"""Helpers that compare our results with transformers' in-process pipelines."""

from __future__ import annotations

from typing import Any

SCORE_TOLERANCE = 1e-5


def assert_same_results(ours: Any, theirs: Any, tol: float = SCORE_TOLERANCE, path: str = "result") -> None:
    """Equal structure and keys, equal strings and ints, floats within `tol`."""
    if hasattr(theirs, "item") and getattr(theirs, "ndim", None) == 0:
        theirs = theirs.item()  # numpy scalars (transformers' np.float32 scores) compare as Python numbers
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: expected a dict, got {type(ours).__name__}"
        assert set(ours) == set(theirs), f"{path}: keys {sorted(ours)} != {sorted(theirs)}"
        for key in theirs:
            assert_same_results(ours[key], theirs[key], tol, f"{path}.{key}")
    elif isinstance(theirs, (list, tuple)):
        assert isinstance(ours, (list, tuple)), f"{path}: expected a list, got {type(ours).__name__}"
        assert len(ours) == len(theirs), f"{path}: length {len(ours)} != {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_results(a, b, tol, f"{path}[{i}]")
    elif isinstance(theirs, float):
        assert isinstance(ours, (int, float)), f"{path}: expected a number, got {ours!r}"
        assert abs(ours - theirs) <= tol, f"{path}: {ours} != {theirs} (tolerance {tol})"
    else:
        if hasattr(theirs, "item"):
            theirs = theirs.item()
        assert ours == theirs, f"{path}: {ours!r} != {theirs!r}"
