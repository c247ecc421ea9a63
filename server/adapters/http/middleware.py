"""What every HTTP request passes before a route: the bearer token and the body size limit.

Both are plain ASGI middleware (no buffering of bodies), and answer in the error shape of the
API the path belongs to (`errors.renderer_for`).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeserve.server.adapters.http.errors import renderer_for

# Open without the token, as grpc.health.v1 is on gRPC: kubelet probes carry no credentials.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
DENIED = "missing or wrong bearer token in the authorization header"


class BearerToken:
    """Refuses requests without `authorization: Bearer <token>` with 401 (health stays open)."""

    def __init__(self, app: ASGIApp, token: str):
        if not token:
            raise ValueError("the bearer token must not be empty")
        self.app = app
        self._expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = bearer_token(scope)
        # compare_digest: the time taken must not tell how much of a guessed token was right.
        if given is not None and hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        await renderer_for(scope["path"])(401, DENIED)(scope, receive, send)


def bearer_token(scope: Scope) -> bytes | None:
    """The token of an `authorization: Bearer <token>` header (the scheme is case-insensitive)."""
    for key, value in scope.get("headers", ()):
        if key != b"authorization":
            continue
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":
            return token.strip()
    return None


class BodyLimit:
    """413 for a body over `limit` bytes (the gRPC max_receive_message_bytes): at once from
    Content-Length, else while the body streams in (chunked uploads), counted as the route reads it.

    Past the limit the route reads a disconnect (Starlette raises ClientDisconnect), and whatever
    it sends then is dropped: the 413 is the answer.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send, f"{declared} bytes")
            return
        received = 0
        refused = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    if not started:
                        await self._refuse(scope, receive, send, f"more than {self.limit} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        message = (f"the request body holds {size}; the server takes at most {self.limit} bytes "
                   "(--max-receive-message-bytes)")
        response = renderer_for(scope["path"])(413, message)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
