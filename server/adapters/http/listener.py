"""The HTTP listener: uvicorn serving the ASGI app inside the server's own event loop.

Not a thread and not a second process: HTTP requests reach the same DataPlane, scheduler and
engine as gRPC calls, on the same loop. uvicorn's own signal handling is off (the server's
`serve()` owns SIGTERM/SIGINT and drains both protocols), as is its logging setup (the server's
logging is already configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from pipeserve.server.settings import ServerSettings


class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server without signal handlers, telling when its sockets listen."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn replaces the process's SIGINT/SIGTERM handlers with its own (signal.signal) for
        # as long as it serves, and re-raises the signal when it stops: the server's drain would
        # never run. The server's own handlers stay in place.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class HttpListener:
    """Serves `app` on settings.host:settings.http_port (TLS/mTLS as the gRPC port). `start()`
    returns the bound port; `stop()` closes the port and waits (up to `grace`) for open connections."""

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None

    @property
    def tls(self) -> bool:
        return bool(self.settings.tls_cert)

    def _config(self) -> uvicorn.Config:
        # The gRPC port's credentials (security.server_credentials) already checked the files' pairing.
        s = self.settings
        tls = {}
        if s.tls_cert:
            tls = {"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key}
            if s.tls_client_ca:
                tls.update(ssl_ca_certs=s.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ws="none",
            # Open connections get this long to finish at stop(), after the drain gave calls theirs.
            timeout_graceful_shutdown=1,
            **tls,
        )

    def _bind(self) -> socket.socket:
        address = (self.settings.host, self.settings.http_port)
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        # Made by hand with proto IPPROTO_TCP (socket.create_server passes 0): asyncio sets
        # TCP_NODELAY only on sockets it sees as TCP, and without it each response's second
        # write waited for the client's delayed ACK (~40 ms a call).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {self.settings.host}:{self.settings.http_port} "
                                     f"(--http-port): {exc.strerror}") from exc
        sock.setblocking(False)
        return sock

    async def start(self) -> int:
        # uvicorn's own INFO lines ("Started server process", "Shutting down") would tell of a
        # server of its own; the server logs its listeners and its drain. Its warnings and errors stay.
        uvicorn_log = logging.getLogger("uvicorn.error")
        if uvicorn_log.level == logging.NOTSET:
            uvicorn_log.setLevel(logging.WARNING)
        config = self._config()
        config.load()  # reads the certificates now: a bad path fails the start, not the first call
        self._socket = self._bind()
        self.port = self._socket.getsockname()[1]
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-listener")
        listening = asyncio.create_task(self._server.listening.wait())
        await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            listening.cancel()
            self._socket.close()
            error = self._task.exception() if not self._task.cancelled() else None
            raise OSError(f"the HTTP listener did not start: {error!r}")
        return self.port

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            if self._socket is not None:
                self._socket.close()
            self._server = None
