"""Channels to a pipeserve server: TCP or unix socket, TLS / mTLS, a bearer token, retries."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

DEFAULT_TARGET = "localhost:8001"
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
# Worth retrying: the server (or a backend behind it) is momentarily unable to answer.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach the server. `target` is "host:port" or "unix:/path/to.sock"."""

    target: str = DEFAULT_TARGET
    # TLS: the CA that signed the server's certificate (or True for the system roots).
    tls_ca: str | bool | None = None
    # mTLS: the client's certificate and key.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Sent as `authorization: Bearer <token>` on every call.
    token: str | None = None
    # Seconds per call; None waits as long as the server takes.
    timeout: float | None = None
    # Attempts after the first on UNAVAILABLE, with exponential backoff and jitter.
    retries: int = 3
    backoff: float = 0.1
    metadata: tuple[tuple[str, str], ...] = ()

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca and not self.tls_cert:
            return None
        root = Path(self.tls_ca).read_bytes() if isinstance(self.tls_ca, str) else None
        key = Path(self.tls_key).read_bytes() if self.tls_key else None
        cert = Path(self.tls_cert).read_bytes() if self.tls_cert else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)

    def call_metadata(self) -> list[tuple[str, str]]:
        metadata = list(self.metadata)
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return metadata

    def sync_channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.secure_channel(self.target, creds, options=_OPTIONS)
        return grpc.insecure_channel(self.target, options=_OPTIONS)

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.aio.secure_channel(self.target, creds, options=_OPTIONS)
        return grpc.aio.insecure_channel(self.target, options=_OPTIONS)

    def delay(self, attempt: int) -> float:
        return self.backoff * (2**attempt) * (0.5 + random.random() / 2)


def call_with_retries(options: ConnectionOptions, call: Callable[[], T]) -> T:
    for attempt in range(options.retries + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt == options.retries:
                raise
            time.sleep(options.delay(attempt))
    raise AssertionError("unreachable")


async def acall_with_retries(options: ConnectionOptions, call: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(options.retries + 1):
        try:
            return await call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt == options.retries:
                raise
            await asyncio.sleep(options.delay(attempt))
    raise AssertionError("unreachable")


def call_kwargs(options: ConnectionOptions, timeout: float | None) -> dict[str, Any]:
    timeout = options.timeout if timeout is None else timeout
    kwargs: dict[str, Any] = {"metadata": options.call_metadata() or None}
    if timeout is not None:
        kwargs["timeout"] = timeout
    return kwargs
