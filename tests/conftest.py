"""Fixtures: the default model repository (built once) and the real server on a loopback port."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `pipeserve serve` does (server/cli.py): spinning OpenMP workers stall on shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeserve.server.settings import ServerSettings  # noqa: E402
from tests.server_harness import ServerThread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The same folder `make run` serves: built once, reused by later runs.
REPOSITORY = Path(os.environ.get("PIPESERVE_TEST_REPOSITORY", ROOT / "model_repository"))


@pytest.fixture(scope="session")
def model_repository() -> Path:
    from pipeserve.model_builder import build_default_repository

    build_default_repository(REPOSITORY)
    return REPOSITORY


def server_settings(repository: Path, **overrides) -> ServerSettings:
    # Ports 0: free ones, so that test servers never clash (self.port, self.http_port tell which).
    settings = ServerSettings(model_repository=repository, host="127.0.0.1", port=0, http_port=0, metrics_port=-1,
                              grace_period=5)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


@pytest.fixture(scope="session")
def server(model_repository: Path):
    """The real server with every default model, shared by the tests of a session."""
    running = ServerThread(server_settings(model_repository)).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def target(server: ServerThread) -> str:
    return server.target
