"""Poll mode (--model-control-mode poll): the served models follow the repository folder.

Every `interval` seconds the poller compares each model folder with what it held at the last
look: a new model loads, a changed one reloads (only the versions whose files or config changed),
and a removed one unloads once its in-flight requests finish. A load that fails leaves what served
before serving and is retried when the folder changes again, not at every poll.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pipeserve.server.errors import PipeserveError
from pipeserve.server.model_registry import ModelRegistry

log = logging.getLogger("pipeserve.models")


@dataclass
class PollReport:
    """What one poll did, by model name."""

    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class RepositoryPoller:
    def __init__(self, registry: ModelRegistry, interval: float):
        if interval <= 0:
            raise ValueError(f"repository_poll_seconds must be > 0, got {interval}")
        self.registry = registry
        self.interval = interval
        # Model name -> the folder's fingerprint at the last look.
        self._seen: dict[str, tuple] = {}
        self._task: asyncio.Task | None = None
        self._polling = asyncio.Lock()

    async def _snapshot(self) -> dict[str, tuple]:
        repository = self.registry.repository

        def look() -> dict[str, tuple]:
            return {name: repository.fingerprint(repository.root / name) for name in repository.model_names()}

        return await asyncio.to_thread(look)

    async def start(self) -> None:
        """Remembers the repository as the start-up load left it, then polls in the background."""
        self._seen = await self._snapshot()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="repository-poller")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except Exception:  # a poll must never end polling
                log.exception("repository poll failed")

    async def poll_once(self) -> PollReport:
        """Brings the served models in line with the repository now."""
        async with self._polling:
            report = PollReport()
            now = await self._snapshot()
            for name, fingerprint in now.items():
                if self._seen.get(name) == fingerprint:
                    continue
                self._seen[name] = fingerprint
                try:
                    await self.registry.load(name, reuse_unchanged=True)
                    report.loaded.append(name)
                except PipeserveError as exc:
                    report.failed[name] = exc.message
                    log.error("poll: model %s failed to load: %s", name, exc.message)
                except Exception as exc:
                    report.failed[name] = f"{type(exc).__name__}: {exc}"
                    log.exception("poll: model %s failed to load", name)
            for name in [n for n in self._seen if n not in now]:
                del self._seen[name]
                if name in self.registry.served:
                    await self.registry.unload(name)
                    report.unloaded.append(name)
            if report.loaded or report.unloaded or report.failed:
                log.info("poll: loaded %s, unloaded %s, failed %s", report.loaded, report.unloaded, sorted(report.failed))
            return report
