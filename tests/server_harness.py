"""Starts the real pipeserve server for tests: in a background thread, or as a subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from pipeserve.server.app import PipeserveServer
from pipeserve.server.settings import ServerSettings

ROOT = Path(__file__).resolve().parent.parent


class ServerThread:
    """The real server on an ephemeral loopback port, in its own thread and event loop.

    Tests then call it over the wire with any client, sync or asyncio, from their own thread.
    """

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.server: PipeserveServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="pipeserve-test-server", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = PipeserveServer(self.settings)
            await self.server.start()
        except BaseException as exc:  # surfaced to the test that started us
            self._error = exc
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self.server.stop(grace=5)

    def start(self, timeout: float = 300) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def target(self) -> str:
        assert self.server is not None and self.server.port is not None
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """The HTTP listener's base URL (http_port must not be -1)."""
        assert self.server is not None and self.server.http_port is not None
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.server.http_port}"

    def run(self, coro, timeout: float = 60):
        """Runs a coroutine on the server's loop (to inspect or change server state)."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, timeout: float = 60):
        """Calls a plain function on the server's loop thread."""

        async def wrapper():
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pipeserve serve` as a real subprocess (signals, exit codes, the CLI itself)."""

    def __init__(self, repository: Path, *extra: str, env: dict[str, str] | None = None, port: int | None = None,
                 http: bool = False):
        self.port = port or free_port()
        # HTTP on a free port of its own when the test wants it; off otherwise (the default 8000
        # would clash between test servers).
        self.http_port = free_port() if http else -1
        self.args = [sys.executable, "-m", "pipeserve.server.cli", "serve", "--model-repository", str(repository),
                     "--host", "127.0.0.1", "--port", str(self.port), "--http-port", str(self.http_port),
                     "--metrics-port", "-1", *extra]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"pipeserve-{self.port}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        assert self.http_port > 0, "started without http=True"
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 120) -> ServerProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        wait_serving(self.target, timeout, self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_serving(target: str, timeout: float, process: ServerProcess | None = None, service: str = "") -> None:
    """Waits until grpc.health.v1 reports SERVING for `service`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.proc is not None and process.proc.poll() is not None:
                raise RuntimeError(f"server exited with {process.proc.returncode}:\n{process.log()[-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"server at {target} not SERVING after {timeout}s" + (f":\n{process.log()[-3000:]}" if process else ""))
