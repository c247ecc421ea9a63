"""Where the server listens: TCP (TLS when configured), a unix socket, and a health-only port."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from pipeserve.server.settings import ServerSettings


def bind_tcp(server: grpc.aio.Server, settings: ServerSettings, credentials: grpc.ServerCredentials | None) -> int | None:
    """Binds host:port (TLS with credentials); returns the bound port, None with port -1."""
    if settings.port < 0:
        return None
    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def bind_unix_socket(server: grpc.aio.Server, settings: ServerSettings) -> None:
    """Binds the unix socket, plaintext: only processes that may open the file reach it."""
    if not settings.unix_socket:
        return
    path = Path(settings.unix_socket)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A socket file left by a process that died is stale; binding over it would fail.
    path.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{path}")


def apply_unix_socket_mode(settings: ServerSettings) -> None:
    """chmod the socket once it exists (after the server started), e.g. 0660 for a sidecar's group."""
    if settings.unix_socket and settings.unix_socket_mode:
        os.chmod(settings.unix_socket, int(settings.unix_socket_mode, 8))


async def start_health_listener(settings: ServerSettings, servicer: object) -> tuple[grpc.aio.Server, int] | None:
    """A plaintext server with grpc.health.v1 alone, for kubelet probes; None when health_port is -1.

    It shares the main server's HealthServicer, so both answer the same statuses.
    """
    if settings.health_port < 0:
        return None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{settings.host}:{settings.health_port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    return server, port
