"""Channels to a pipeserve server: TCP or unix socket, TLS / mTLS, a bearer token, deadlines, retries."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

T = TypeVar("T")

DEFAULT_TARGET = "localhost:8001"
#: Read when a pipeline or the CLI is given no target (a sidecar's app sets it once).
TARGET_ENV = "PIPESERVE_TARGET"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Worth retrying: the server (or a backend behind it) is momentarily unable to answer, e.g. a
# replica draining on SIGTERM or a sidecar that has not bound its socket yet. Every other code
# (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) is the caller's to handle.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


def default_target() -> str:
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach the server and how to call it.

    `target` is "host:port", "dns:///host:port" or "unix:/path/to.sock" (a sidecar's socket).
    """

    target: str = DEFAULT_TARGET
    # TLS: the PEM file of the CA that signed the server's certificate, or True for the system roots.
    tls_ca: str | bool | None = None
    # mTLS: the client's certificate chain and private key (PEM files).
    tls_cert: str | None = None
    tls_key: str | None = None
    # The name the server's certificate must carry, when it differs from the target's host
    # (e.g. connecting by IP address).
    tls_server_name: str | None = None
    # Sent as `authorization: Bearer <token>` on every call.
    token: str | None = None
    # Seconds for a whole call, retries included; None waits as long as the server takes.
    timeout: float | None = None
    # Attempts after the first on UNAVAILABLE, with exponential backoff and jitter.
    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 5.0
    # Ride through the server's transient states within the call's deadline instead of failing at
    # once with UNAVAILABLE: wait for the channel to connect (the server is not up yet), and keep
    # retrying UNAVAILABLE answers (models still loading, a reload, a replica draining) past
    # `retries`, with backoff, until the deadline (none: until answered). For apps that start
    # beside their sidecar.
    wait_for_ready: bool = False
    # Extra metadata on every call (keys in lower case), e.g. (("x-request-id", "..."),).
    metadata: tuple[tuple[str, str], ...] = ()
    # gRPC's load-balancing policy: "round_robin" spreads calls over every address a
    # "dns:///name:port" target resolves to (a headless Service's pods); None: pick_first.
    lb_policy: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("mTLS needs both tls_cert and tls_key")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")

    @property
    def secure(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        root = Path(self.tls_ca).read_bytes() if isinstance(self.tls_ca, str) else None
        key = Path(self.tls_key).read_bytes() if self.tls_key else None
        cert = Path(self.tls_cert).read_bytes() if self.tls_cert else None
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        if self.lb_policy:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{self.lb_policy: {}}]})))
        return options

    def call_metadata(self) -> list[tuple[str, str]]:
        metadata = list(self.metadata)
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return metadata

    def sync_channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.secure_channel(self.target, creds, options=self.channel_options())
        return grpc.insecure_channel(self.target, options=self.channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is not None:
            return grpc.aio.secure_channel(self.target, creds, options=self.channel_options())
        return grpc.aio.insecure_channel(self.target, options=self.channel_options())

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter, so that many clients do not retry in step."""
        return min(self.max_backoff, self.backoff * (2 ** min(attempt, 30))) * (0.5 + random.random() / 2)


class CallBudget:
    """One call's deadline across its attempts: each attempt gets what is left, not a fresh timeout."""

    def __init__(self, options: ConnectionOptions, timeout: float | None):
        self.options = options
        timeout = options.timeout if timeout is None else timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"metadata": self.options.call_metadata() or None}
        if self.deadline is not None:
            kwargs["timeout"] = max(0.0, self.deadline - time.monotonic())
        if self.options.wait_for_ready:
            kwargs["wait_for_ready"] = True
        return kwargs

    def retry_delay(self, error: grpc.RpcError, attempt: int) -> float | None:
        """Seconds to wait before the next attempt, or None when the error is final."""
        if error.code() not in RETRYABLE:
            return None
        if attempt >= self.options.retries and not self.options.wait_for_ready:
            return None
        delay = self.options.delay(attempt)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None  # no time left for another attempt: report the real error, not a timeout
        return delay


def invoke_unary(options: ConnectionOptions, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
    """Calls a unary stub method, retrying on UNAVAILABLE with backoff within the call's deadline."""
    budget = CallBudget(options, timeout)
    attempt = 0
    while True:
        try:
            return method(request, **budget.kwargs())
        except grpc.RpcError as exc:
            delay = budget.retry_delay(exc, attempt)
            if delay is None:
                raise
            time.sleep(delay)
            attempt += 1


async def ainvoke_unary(options: ConnectionOptions, method: Callable[..., Awaitable[T]], request: Any,
                        timeout: float | None = None) -> T:
    """The asyncio twin of `invoke_unary` (method: a grpc.aio stub method)."""
    budget = CallBudget(options, timeout)
    attempt = 0
    while True:
        try:
            return await method(request, **budget.kwargs())
        except grpc.RpcError as exc:
            delay = budget.retry_delay(exc, attempt)
            if delay is None:
                raise
            await asyncio.sleep(delay)
            attempt += 1


def invoke_stream(options: ConnectionOptions, method: Callable[..., Any], request: Any,
                  timeout: float | None = None) -> Iterator[Any]:
    """Yields a server-streaming call's messages. Retries on UNAVAILABLE only before the first
    message: a stream that has begun cannot be resumed without repeating what was yielded.
    Closing the iterator early cancels the call on the server."""
    budget = CallBudget(options, timeout)
    attempt = 0
    while True:
        started = False
        call = method(request, **budget.kwargs())
        try:
            for message in call:
                started = True
                yield message
            return
        except grpc.RpcError as exc:
            delay = None if started else budget.retry_delay(exc, attempt)
            if delay is None:
                raise
        finally:
            call.cancel()  # a no-op once the stream ended; frees the server's work when the caller stops early
        time.sleep(delay)
        attempt += 1


async def ainvoke_stream(options: ConnectionOptions, method: Callable[..., Any], request: Any,
                         timeout: float | None = None) -> AsyncIterator[Any]:
    """The asyncio twin of `invoke_stream`."""
    budget = CallBudget(options, timeout)
    attempt = 0
    while True:
        started = False
        call = method(request, **budget.kwargs())
        try:
            async for message in call:
                started = True
                yield message
            return
        except grpc.RpcError as exc:
            delay = None if started else budget.retry_delay(exc, attempt)
            if delay is None:
                raise
        finally:
            call.cancel()
        await asyncio.sleep(delay)
        attempt += 1


# The first version's helpers, kept for code written against them: `call` takes no arguments
# (the caller bound request and call_kwargs), so each attempt gets the whole timeout again.
def call_with_retries(options: ConnectionOptions, call: Callable[[], T]) -> T:
    attempt = 0
    while True:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt >= options.retries:
                raise
            time.sleep(options.delay(attempt))
            attempt += 1


async def acall_with_retries(options: ConnectionOptions, call: Callable[[], Awaitable[T]]) -> T:
    attempt = 0
    while True:
        try:
            return await call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt >= options.retries:
                raise
            await asyncio.sleep(options.delay(attempt))
            attempt += 1


def call_kwargs(options: ConnectionOptions, timeout: float | None) -> dict[str, Any]:
    """Keyword arguments for one attempt of a call (metadata, timeout, wait_for_ready)."""
    return CallBudget(options, timeout).kwargs()
