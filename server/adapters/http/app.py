"""The HTTP app: every HTTP route of the server in one Starlette app, behind the token and size checks."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from pipeserve.server.adapters.http.errors import renderer_for
from pipeserve.server.adapters.http.generate import routes as generate_routes
from pipeserve.server.adapters.http.kserve import routes as kserve_routes
from pipeserve.server.adapters.http.middleware import BearerToken, BodyLimit
from pipeserve.server.adapters.http.openai import routes as openai_routes
from pipeserve.server.adapters.http.pipelines import routes as pipelines_routes
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.settings import ServerSettings


def http_routes(plane: DataPlane, control: ControlPlane, settings: ServerSettings) -> list[BaseRoute]:
    """KServe v2 REST with Triton's generate extension, the typed pipelines, the OpenAI API."""
    return [
        *kserve_routes(plane, control, settings.max_receive_message_bytes),
        *generate_routes(plane, control),
        *pipelines_routes(plane, control),
        *openai_routes(plane, control),
    ]


def build_http_app(plane: DataPlane, control: ControlPlane, settings: ServerSettings) -> Starlette:
    # Outermost first: the token before anything reads the body, then the size limit.
    middleware = []
    if settings.auth_token:
        middleware.append(Middleware(BearerToken, token=settings.auth_token))
    middleware.append(Middleware(BodyLimit, limit=settings.max_receive_message_bytes))
    return Starlette(
        routes=http_routes(plane, control, settings),
        middleware=middleware,
        exception_handlers={404: _not_found, 405: _method_not_allowed},
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return renderer_for(request.url.path)(404, f"no endpoint at {request.method} {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    response = renderer_for(request.url.path)(405, f"{request.url.path} does not take {request.method}")
    allow = getattr(exc, "headers", None) or {}
    if "allow" in {k.lower() for k in allow}:
        response.headers["allow"] = next(v for k, v in allow.items() if k.lower() == "allow")
    return response
