"""Assembles the server: the gRPC adapters, health, reflection, the HTTP listener, and the drain on shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeserve.server import heap, listeners
from pipeserve.server.adapters import services
from pipeserve.server.adapters.health import HealthReporter
from pipeserve.server.adapters.http.app import build_http_app
from pipeserve.server.adapters.http.listener import HttpListener
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.metrics import MetricsExporter
from pipeserve.server.model_control import RepositoryPoller
from pipeserve.server.model_registry import ModelRegistry
from pipeserve.server.repository.repository import ModelRepository
from pipeserve.server.settings import ServerSettings

log = logging.getLogger("pipeserve.server")

# Calls gRPC holds before the server picks them up; past it, gRPC core cancels arrivals at random.
PENDING_CALLS_LIMIT = 10_000
# Seconds between the last call in flight finishing and the listener closing, for calls that
# reached gRPC core but no handler yet to reach one (and be refused UNAVAILABLE, not cancelled).
DRAIN_SETTLE_S = 0.1


class PipeserveServer:
    """The running server. `await start()`, then `await stop()` (or run `serve()`)."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.registry = ModelRegistry(ModelRepository(settings.model_repository), settings.model_control_mode)
        self.metrics = MetricsExporter(self.registry, settings.metrics_host, settings.metrics_port)
        self.poller = (RepositoryPoller(self.registry, settings.repository_poll_seconds)
                       if settings.model_control_mode == "poll" else None)
        self.plane = DataPlane(self.registry)
        self.control = ControlPlane(self.registry, self.plane.gate)
        self.services = services(self.plane, self.control)
        self.health = HealthReporter([s.full_name for s in self.services])
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        # The plaintext health-only listener (settings.health_port), when configured.
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        # The HTTP listener (settings.http_port; None with -1) and its bound port.
        self.http: HttpListener | None = None
        self.http_port: int | None = None
        # Full collections skip what the loaded models hold (heap.py): settled after each change.
        self.heap_settler = heap.HeapSettler()
        self.registry.listeners.append(self._on_models_changed)
        self.ready = asyncio.Event()
        self._stopped = False

    def _on_models_changed(self, _event: str, _served: object) -> None:
        if self.registry.started:  # the start-up loads settle once, when they are all done
            self.heap_settler.schedule()

    def _server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_send_message_bytes),
            # gRPC core cancels calls waiting for the server to pick them up (status CANCELLED, as
            # if the client had) once more than 1,000 wait: a burst of a few thousand calls would
            # lose some. Let more wait; the models' queues refuse overload with RESOURCE_EXHAUSTED.
            ("grpc.server.max_pending_requests", PENDING_CALLS_LIMIT),
            ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS_LIMIT),
            ("grpc.so_reuseport", 0),
        ]

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        from pipeserve.server.adapters.request_decoding import RequestDecodingInterceptor
        from pipeserve.server.security import interceptors

        # The token check first, so that an unauthenticated caller learns nothing about messages.
        return [*interceptors(self.settings), RequestDecodingInterceptor()]

    def _credentials(self) -> grpc.ServerCredentials | None:
        from pipeserve.server.security import server_credentials

        return server_credentials(self.settings)

    async def start(self) -> None:
        """Binds the listeners, reports NOT_SERVING, loads the models, then reports SERVING."""
        self.server = grpc.aio.server(options=self._server_options(), interceptors=self._interceptors())
        for service in self.services:
            service.add_to_server(service.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        names = [s.full_name for s in self.services] + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                        reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, self.server)
        self.port = listeners.bind_tcp(self.server, self.settings, self._credentials())
        listeners.bind_unix_socket(self.server, self.settings)
        self.metrics.start()
        await self.health.starting()
        await self.server.start()
        listeners.apply_unix_socket_mode(self.settings)
        health_listener = await listeners.start_health_listener(self.settings, self.health.servicer)
        if health_listener is not None:
            self.health_server, self.health_port = health_listener
        await self._start_http()
        log.info("listening on %s", ", ".join(self.addresses()))
        await self.registry.load_all(self.settings.load_models or None)
        heap.settle()
        if self.poller is not None:
            await self.poller.start()
        await self.health.serving()
        self.ready.set()
        log.info("ready: %d model versions", len(self.registry.all_served()))

    async def _start_http(self) -> None:
        if self.settings.http_port < 0:
            return
        self.http = HttpListener(build_http_app(self.plane, self.control, self.settings), self.settings)
        self.http_port = await self.http.start()

    def addresses(self) -> list[str]:
        found = []
        if self.port is not None:
            found.append(f"{self.settings.host}:{self.port}")
        if self.http_port is not None:
            scheme = "https" if self.http is not None and self.http.tls else "http"
            found.append(f"{scheme}://{self.settings.host}:{self.http_port}")
        if self.settings.unix_socket:
            found.append(f"unix:{self.settings.unix_socket}")
        if self.health_port is not None:
            found.append(f"{self.settings.host}:{self.health_port} (health only)")
        return found

    async def stop(self, grace: float | None = None) -> None:
        """Drains: readiness goes NOT_SERVING first, new calls get UNAVAILABLE, calls in flight finish."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period if grace is None else grace
        log.info("draining (grace period %.1fs)", grace)
        await self.health.draining()
        if self.poller is not None:
            await self.poller.stop()  # the models stay as they are while calls drain
        # Refuse new calls with UNAVAILABLE while health still answers NOT_SERVING, and give
        # the calls in flight the grace period; then close the listeners.
        if not await self.plane.gate.drain(grace):
            log.warning("grace period over with %d calls in flight; cancelling them", self.plane.gate.in_flight)
        # Calls that reached gRPC core but no handler yet are picked up (and held) meanwhile; then
        # the held refusals go out and the listener closes at once (see CallGate.REFUSAL_HOLD_S).
        self.plane.gate.closing = True
        await asyncio.sleep(DRAIN_SETTLE_S)
        self.plane.gate.release_refusals()
        # Both listeners close together: the drain above has let their calls finish.
        await asyncio.gather(*([self.server.stop(1.0)] if self.server is not None else []),
                             *([self.http.stop()] if self.http is not None else []))
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.registry.close()
        self.heap_settler.close()
        self.metrics.stop()
        log.info("stopped")


async def serve(settings: ServerSettings) -> int:
    """Runs the server until SIGTERM or SIGINT, then drains; returns the exit code."""
    server = PipeserveServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is not None:
        raise starting.exception()  # type: ignore[misc]
    await stop.wait()
    if not starting.done():
        starting.cancel()
    await server.stop()
    return 0
