"""Transport security and authentication: TLS / mTLS credentials and the bearer-token check."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from pipeserve.server.settings import ServerSettings

# Health and reflection stay open so that probes and tooling work without the token.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
DENIED = "missing or wrong bearer token in the authorization metadata"


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS for the TCP port when a certificate is set; mTLS when a client CA is set as well."""
    if not (settings.tls_cert or settings.tls_key or settings.tls_client_ca):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key (and --tls-client-ca only with them)")
    pair = (_read(settings.tls_key, "--tls-key"), _read(settings.tls_cert, "--tls-cert"))
    client_ca = _read(settings.tls_client_ca, "--tls-client-ca") if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror}") from exc


async def _deny(context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, DENIED)


async def _deny_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    await _deny(context)


async def _deny_unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await _deny(context)
    yield  # pragma: no cover - makes this an async generator, as a server-streaming handler must be


async def _deny_stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await _deny(context)


async def _deny_stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    await _deny(context)
    yield  # pragma: no cover


# The refusal must have the RPC's own shape: a unary handler on a bidi stream (KServe's
# ModelStreamInfer) would wait for a first request message that a client may never send.
_DENY_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_deny_unary_unary),
    (False, True): grpc.unary_stream_rpc_method_handler(_deny_unary_stream),
    (True, False): grpc.stream_unary_rpc_method_handler(_deny_stream_unary),
    (True, True): grpc.stream_stream_rpc_method_handler(_deny_stream_stream),
}


def bearer_token(metadata: Any) -> bytes | None:
    """The token of an `authorization: Bearer <token>` header (the scheme is case-insensitive)."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        raw = value.encode() if isinstance(value, str) else bytes(value)
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self._expected = token.encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(UNAUTHENTICATED_PREFIXES):
            return await continuation(handler_call_details)
        given = bearer_token(handler_call_details.invocation_metadata)
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if given is not None and hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: refuse it all the same, without naming what exists
            return _DENY_HANDLERS[(False, False)]
        return _DENY_HANDLERS[(handler.request_streaming, handler.response_streaming)]


def interceptors(settings: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    return [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []
