"""Runs every benchmark module's main(), or those named: `python -m bench [classification ...]`.

A benchmark is a module of this package with a `main()`; helpers (no main) and the soak test
(`make soak`, its own target) are not run here.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench

NOT_HERE = {"soak"}


def benchmark_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                  if not m.name.startswith("_") and m.name not in NOT_HERE)


def main(argv: list[str]) -> int:
    names = argv or benchmark_modules()
    unknown = sorted(set(names) - set(benchmark_modules()) - NOT_HERE)
    if unknown:
        print(f"unknown benchmark(s) {unknown}; known: {benchmark_modules()}", file=sys.stderr)
        return 2
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        run = getattr(module, "main", None)
        if run is None:
            continue
        print(f"== bench.{name}", flush=True)
        started = time.monotonic()
        run()
        print(f"== bench.{name}: {time.monotonic() - started:.0f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
