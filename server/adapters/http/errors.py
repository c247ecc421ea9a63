"""pipeserve's typed errors as HTTP statuses, in one place, and the call scope every HTTP route runs in.

gRPC's adapters map `PipeserveError.code` (a grpc.StatusCode name) to a status in
adapters/status.py; this is the HTTP side of the same table. A route raises typed errors (or
`HttpError` for what only HTTP can get wrong: a body that is not JSON, a wrong content type, a
body over the size limit) and `endpoint` turns them into a response in its protocol's error
shape: KServe v2 / Triton's `{"error": "..."}` by default, OpenAI's through its own renderer.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pipeserve.server.dataplane import CallGate, request_model, request_priority
from pipeserve.server.errors import InvalidArgument, PipeserveError

log = logging.getLogger("pipeserve.requests")

T = TypeVar("T")

# grpc.StatusCode name -> HTTP status. FAILED_PRECONDITION is 400, as Triton answers a request the
# server's state refuses (a model of another task, load/unload with model control off): the client
# must change the request, and retrying it unchanged (what 409 suggests) does not help.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "INVALID_ARGUMENT": 400,
    "OUT_OF_RANGE": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    # nginx's "client closed request": the caller went away (it will not read the answer).
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# Header that sets a call's scheduling priority, as the `pipeserve-priority` metadata does on gRPC.
PRIORITY_HEADER = "pipeserve-priority"


class HttpError(Exception):
    """A request refused for what only HTTP can get wrong (413, 415, a body that is not JSON)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def http_status(error: BaseException) -> int:
    """The HTTP status of a typed error (or of an HttpError); anything else is 500."""
    if isinstance(error, HttpError):
        return error.status
    if isinstance(error, PipeserveError):
        return HTTP_STATUS.get(error.code, 500)
    return 500


def error_message(error: BaseException) -> str:
    if isinstance(error, (HttpError, PipeserveError)):
        return error.message
    return f"internal error: {type(error).__name__}: {error}"


# -- error shapes --------------------------------------------------------------------------------

ErrorRenderer = Callable[[int, str], Response]


def v2_error(status: int, message: str) -> Response:
    """KServe v2 / Triton's error body, `{"error": "<message>"}`; also the pipelines' shape."""
    return JSONResponse({"error": message}, status_code=status, headers=_auth_challenge(status))


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 429: "rate_limit_error"}


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    """OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`."""
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=_auth_challenge(status))


def _auth_challenge(status: int) -> dict[str, str] | None:
    return {"www-authenticate": 'Bearer realm="pipeserve"'} if status == 401 else None


# Paths under /v1/ are OpenAI's API except the typed pipelines; the listener's own refusals (401,
# 413, 503 before a route runs) take the shape of the API the path belongs to.
OPENAI_PATHS = ("/v1/",)
NOT_OPENAI_PATHS = ("/v1/pipelines",)


def renderer_for(path: str) -> ErrorRenderer:
    if path.startswith(OPENAI_PATHS) and not path.startswith(NOT_OPENAI_PATHS):
        return openai_error
    return v2_error


# -- request bodies ------------------------------------------------------------------------------


async def json_body(request: Request, *, required: bool = True) -> Any:
    """The request's JSON body; 415 for another content type, 400 for a body that does not parse."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    body = await request.body()
    if not body and not required:
        return None
    if media and media != "application/json" and not media.endswith("+json"):
        raise HttpError(415, f"content-type {media!r} is not supported; send application/json "
                        "(curl: -H 'content-type: application/json')")
    return parse_json(body)


def parse_json(body: bytes, what: str = "the request body") -> Any:
    if not body:
        raise HttpError(400, f"{what} is empty; send a JSON object")
    try:
        # Decoded here: json.loads would take a UTF-16 or UTF-32 body too, which JSON over HTTP is not.
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"{what} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise HttpError(400, f"{what} nests arrays or objects too deeply") from None


def json_object(value: Any, what: str, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`value` as a JSON object, refusing keys outside `allowed` (None: any)."""
    if not isinstance(value, dict):
        raise InvalidArgument(what, f"must be a JSON object, got {type(value).__name__}")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise InvalidArgument(f"{what}.{key}" if what != "body" else key,
                                      f"is not a field here; fields: {', '.join(allowed)}")
    return value


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and so withdrawing its inputs from the model's queue, as a
    cancelled gRPC call does) if the client disconnects first. Call it once the body is read:
    from then on the request's receive() only ever reports the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the call scope ------------------------------------------------------------------------------


class GatedStream:
    """Marks a streaming response that holds the call's place in the drain gate until it ends:
    `endpoint` hands the gate's exit to `on_close` instead of leaving the gate at return."""

    def on_close(self, callback: Callable[[], None]) -> None:
        raise NotImplementedError


def priority_of(request: Request) -> int:
    value = request.headers.get(PRIORITY_HEADER)
    if value is None:
        return 0
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(PRIORITY_HEADER, f"must be an integer (1 = most urgent), got {value!r}") from None


def endpoint(gate: CallGate | None, render: ErrorRenderer = v2_error) -> Callable:
    """Wraps a route: the drain gate (None: never refused, for health), typed errors and
    HttpErrors to `render`ed responses with their HTTP status, anything else 500, the log line."""

    def decorate(method: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(method)
        async def wrapper(request: Request) -> Response:
            started = time.perf_counter()
            request_model.set("")
            status = 500
            held = False
            try:
                if gate is not None:
                    gate.enter()
                    held = True
                request_priority.set(priority_of(request))
                response = await method(request)
                status = response.status_code
                if held and isinstance(response, GatedStream):
                    response.on_close(gate.exit)  # type: ignore[union-attr]
                    held = False
                return response
            except (PipeserveError, HttpError) as exc:
                status = http_status(exc)
                return render(status, error_message(exc))
            except ClientDisconnect:
                # Nobody reads the answer (uvicorn drops what is sent to a closed connection); no
                # traceback for a client that went away.
                status = 499
                return Response(status_code=499)
            except Exception as exc:
                log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
                return render(500, error_message(exc))
            finally:
                if held:
                    gate.exit()  # type: ignore[union-attr]
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("http=%s %s model=%s status=%d duration_ms=%.3f", request.method, request.url.path,
                              request_model.get() or "-", status, (time.perf_counter() - started) * 1e3)

        return wrapper

    return decorate
