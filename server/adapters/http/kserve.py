"""KServe v2 / Open Inference Protocol over HTTP, as Triton serves it, so that tritonclient.http
works unchanged: health, server and model metadata, readiness, config, statistics, inference
(JSON tensors and Triton's binary tensor extension) and the model repository.

The same calls as the gRPC adapter (kserve.py), through the same protocol-neutral core
(kserve_inference.py) and the same Triton messages for config and statistics (sent as their
JSON). Model management through the ControlPlane, inference through the DataPlane.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from tritonclient.grpc import service_pb2 as v2

from pipeserve.server.adapters.http.errors import HttpError, endpoint, json_body, json_object, unless_disconnected
from pipeserve.server.adapters.http.v2_tensors import (
    BINARY_CONTENT_TYPE,
    HEADER_LENGTH,
    infer_response_body,
    parse_infer_request,
    proto_json,
    tensor_metadata,
)
from pipeserve.server.adapters.kserve import model_config, model_statistics
from pipeserve.server.adapters.kserve_inference import (
    EXTENSIONS,
    SERVER_NAME,
    V2Inference,
    V2Response,
    parse_version,
    platform,
    repository_index,
    server_version,
)
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, Unimplemented

# A model's path, with or without a version: /v2/models/{model}[/versions/{version}]
MODEL_PATHS = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")


class KServeRest:
    """The v2 REST endpoints over the data and control planes."""

    def __init__(self, plane: DataPlane, control: ControlPlane, body_limit: int):
        self.plane = plane
        self.control = control
        self.inference = V2Inference(plane, control)
        self.body_limit = body_limit
        gated = endpoint(plane.gate)
        # Health is answered even while draining (ready turns false), never refused.
        self.live = endpoint(None)(self._live)
        self.server_ready = endpoint(None)(self._server_ready)
        self.model_ready = endpoint(None)(self._model_ready)
        self.server_metadata = gated(self._server_metadata)
        self.model_metadata = gated(self._model_metadata)
        self.model_config = gated(self._model_config)
        self.statistics = gated(self._statistics)
        self.infer = gated(self._infer)
        self.index = gated(self._index)
        self.load = gated(self._load)
        self.unload = gated(self._unload)
        self.unsupported = gated(self._unsupported)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.server_ready, methods=["GET"]),
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/models/stats", self.statistics, methods=["GET"]),
            Route("/v2/repository/index", self.index, methods=["POST"]),
            Route("/v2/repository/models/{model}/load", self.load, methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self.unload, methods=["POST"]),
        ]
        for path in MODEL_PATHS:
            routes += [
                Route(path, self.model_metadata, methods=["GET"]),
                Route(f"{path}/ready", self.model_ready, methods=["GET"]),
                Route(f"{path}/config", self.model_config, methods=["GET"]),
                Route(f"{path}/stats", self.statistics, methods=["GET"]),
                Route(f"{path}/infer", self.infer, methods=["POST"]),
            ]
        for path in ("/v2/systemsharedmemory/{rest:path}", "/v2/cudasharedmemory/{rest:path}", "/v2/trace/setting",
                     "/v2/models/{model}/trace/setting", "/v2/logging"):
            routes.append(Route(path, self.unsupported, methods=["GET", "POST"]))
        return routes

    # -- health ---------------------------------------------------------------------------------

    async def _live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def _server_ready(self, request: Request) -> Response:
        # 503 while not ready, so that an HTTP readiness probe reads it without parsing the body.
        ready = self.control.server_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _model_ready(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            version = parse_version(request.path_params.get("version", ""))
        except InvalidArgument:
            ready = False
        else:
            ready = self.control.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    # -- metadata -------------------------------------------------------------------------------

    async def _server_metadata(self, request: Request) -> Response:
        return JSONResponse({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})

    async def _model_metadata(self, request: Request) -> Response:
        model, codec = self.inference.model(request.path_params["model"], request.path_params.get("version", ""))
        return JSONResponse({
            "name": model.name,
            "versions": [str(v) for v in self.control.served_versions(model.name)],
            "platform": platform(model),
            "inputs": tensor_metadata(codec.signature.inputs),
            "outputs": tensor_metadata(codec.signature.outputs),
        })

    async def _model_config(self, request: Request) -> Response:
        model, codec = self.inference.model(request.path_params["model"], request.path_params.get("version", ""))
        return JSONResponse(proto_json(model_config(model, codec.signature)))

    async def _statistics(self, request: Request) -> Response:
        name = request.path_params.get("model", "")
        version = parse_version(request.path_params.get("version", "")) if name else 0
        found = sorted(self.control.statistics(name, version), key=lambda m: (m.name, m.version))
        return JSONResponse(proto_json(v2.ModelStatisticsResponse(model_stats=[model_statistics(m) for m in found])))

    # -- inference ------------------------------------------------------------------------------

    async def _infer(self, request: Request) -> Response:
        header_length = request.headers.get(HEADER_LENGTH)
        if header_length is None:
            _check_json_content_type(request)
        body = await self._decoded_body(request)
        parsed = parse_infer_request(body, header_length, request.path_params["model"],
                                     request.path_params.get("version", ""))
        response = await unless_disconnected(request, _last(self.inference.responses(parsed.request, None)))
        content, json_length = infer_response_body(response, parsed.binary, parsed.binary_default)
        if json_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type=BINARY_CONTENT_TYPE, headers={HEADER_LENGTH: str(json_length)})

    async def _decoded_body(self, request: Request) -> bytes:
        """The body, inflated where Content-Encoding is gzip or deflate (tritonclient's request
        compression), held to the same size limit once inflated."""
        body = await request.body()
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise HttpError(415, f"content-encoding {encoding!r} is not supported; send gzip, deflate or none")
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            data = inflater.decompress(body, self.body_limit + 1)
        except zlib.error as exc:
            raise HttpError(400, f"the body is not valid {encoding} data: {exc}") from None
        if len(data) > self.body_limit or inflater.unconsumed_tail:
            raise HttpError(413, f"the request body inflates to more than {self.body_limit} bytes, the server's limit "
                            "(--max-receive-message-bytes)")
        return data

    # -- model repository -------------------------------------------------------------------------

    async def _index(self, request: Request) -> Response:
        doc = json_object(await json_body(request, required=False) or {}, "body", ("ready", "repository_name"))
        ready = doc.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidArgument("ready", f"must be true or false, got {ready!r}")
        entries = repository_index(self.control, str(doc.get("repository_name", "")), ready)
        return JSONResponse([{k: v for k, v in vars(e).items() if v or k in ("name", "state")} for e in entries])

    async def _load(self, request: Request) -> Response:
        params = await self._repository_parameters(request)
        await self.control.load(request.path_params["model"], overrides=list(params))
        return Response(status_code=200)

    async def _unload(self, request: Request) -> Response:
        params = await self._repository_parameters(request)
        params.pop("unload_dependents", None)  # pipeserve models have no dependents
        # As Triton: unloading a repository model that is not loaded is done already.
        await self.control.unload(request.path_params["model"], not_loaded_ok=True)
        return Response(status_code=200)

    @staticmethod
    async def _repository_parameters(request: Request) -> dict:
        doc = json_object(await json_body(request, required=False) or {}, "body", ("parameters",))
        params = doc.get("parameters") or {}
        return dict(json_object(params, "parameters"))

    async def _unsupported(self, request: Request) -> Response:
        path = request.url.path
        if "sharedmemory" in path:
            raise Unimplemented("shared memory is not supported; send tensors in the request")
        if "trace" in path:
            raise Unimplemented("tracing is not supported; use --log-level debug for one log line per request")
        raise Unimplemented("log settings are not supported at run time; use --log-level and --log-format")


async def _last(responses: AsyncIterator[V2Response]) -> V2Response:
    """The one response of a request that is not streamed."""
    last = None
    async for last in responses:
        pass
    assert last is not None
    return last


def _check_json_content_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise HttpError(415, f"content-type {media!r} is not supported: send application/json, or binary tensors "
                        "with the Inference-Header-Content-Length header")


def routes(plane: DataPlane, control: ControlPlane, body_limit: int = 64 * 1024 * 1024) -> list[BaseRoute]:
    return KServeRest(plane, control, body_limit).routes()

