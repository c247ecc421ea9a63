"""What the benchmarks share: the server as a subprocess on loopback, closed-loop asyncio clients,
latency percentiles, and the results table.

The server runs in its own process so that it and the clients never share a GIL; the clients are
asyncio tasks in this process, each on its own connection, each sending its next request as soon
as the previous one is answered.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
# A load client of any kind: a gRPC stub, a tritonclient, an HTTP client.
C = TypeVar("C")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    """`pipeserve serve` in a subprocess on a loopback port, serving `models` of `repository`."""

    def __init__(self, repository: Path, models: Sequence[str], *extra: str, log_name: str = "server"):
        self.port = free_port()
        # HTTP (KServe v2 REST, OpenAI) on a free port of its own: http_url.
        self.http_port = free_port()
        self.args = [sys.executable, "-m", "pipeserve.server.cli", "serve", "--model-repository", str(repository),
                     "--host", "127.0.0.1", "--port", str(self.port), "--http-port", str(self.http_port),
                     "--metrics-port", "-1",
                     "--load-models", *models, *extra]
        self.log_path = OUT / f"{log_name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> BenchServer:
        OUT.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_serving(300)
        return self

    def _wait_serving(self, timeout: float) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout}s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Measurement:
    """One line of the table: `items` answered in `seconds`, with per-call latencies."""

    model: str
    mode: str
    concurrency: int
    items: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    # Batches the server ran by size, where the row is a server's.
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies, 50) * 1e3

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies, 99) * 1e3

    def as_dict(self) -> dict:
        return {"model": self.model, "mode": self.mode, "concurrency": self.concurrency, "items": self.items,
                "seconds": self.seconds, "per_second": self.rate, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms,
                "batch_sizes": self.batch_sizes}


async def timed_calls(clients: Sequence[C], call: Callable[[C, int], Awaitable[object]], *,
                      seconds: float, warmup: float) -> tuple[list[float], float]:
    """Each of `clients` calls back to back (its n-th call: call(client, n)) for `seconds` after
    `warmup`. Returns the latencies of the calls that ended in the window, and its length."""
    concurrency = len(clients)
    latencies: list[float] = []
    measuring = False
    stop = False

    async def calling(index: int, client: C) -> None:
        n = index
        while not stop:
            started = time.perf_counter()
            await call(client, n)
            if measuring:
                latencies.append(time.perf_counter() - started)
            n += concurrency

    tasks = [asyncio.create_task(calling(i, c)) for i, c in enumerate(clients)]
    await asyncio.sleep(warmup)
    measuring = True
    started = time.perf_counter()
    await asyncio.sleep(seconds)
    measuring = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return latencies, elapsed


async def closed_loop(
    target: str,
    concurrency: int,
    make_stub: Callable[[grpc.aio.Channel], object],
    call: Callable[[object, int], Awaitable[object]],
    *,
    seconds: float,
    warmup: float,
    model: str,
    mode: str = "server",
) -> Measurement:
    """`concurrency` clients, each on its own connection, calling back to back for `seconds`
    after `warmup`; call(stub, n) makes a client's n-th call."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(concurrency)]
    try:
        for channel in channels:
            await channel.channel_ready()
        latencies, elapsed = await timed_calls([make_stub(ch) for ch in channels], call,
                                               seconds=seconds, warmup=warmup)
    finally:
        for channel in channels:
            await channel.close()
    return Measurement(model, mode, concurrency, len(latencies), elapsed, latencies)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(str(h).ljust(w) for h, w in zip(header, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, rule, *body])


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def pyplot():
    """matplotlib's pyplot (headless), or None when matplotlib is not installed: the figures are
    printed either way, and only the plot needs it (`make bench` installs it; elsewhere
    `pip install -e '.[bench]'`)."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("(no plot: matplotlib is not installed; `pip install -e '.[bench]'` adds it)", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

