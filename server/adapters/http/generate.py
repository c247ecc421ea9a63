"""Triton's generate extension: `POST /v2/models/{m}[/versions/{v}]/generate` and `/generate_stream`.

A JSON object in, `{"text_input": "...", "parameters": {...}}` (known generation parameters may
also stand at the top level, as Triton's TensorRT-LLM and vLLM examples send them); out
`{"model_name", "model_version", "text_output"}`, or per batch of new tokens one server-sent event
`data: {...}` with the new text. Parameters are the v2 text-generation codec's (the model's
`/config` lists them), checked and parsed by it; generation goes through `DataPlane.infer` and
`DataPlane.stream`, like every other adapter's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pipeserve.server.adapters.http.errors import endpoint, error_message, json_body, json_object, unless_disconnected
from pipeserve.server.adapters.http.kserve import MODEL_PATHS
from pipeserve.server.adapters.http.sse import EventStream, sse_data
from pipeserve.server.adapters.kserve_codecs import CodecCache
from pipeserve.server.adapters.kserve_generation_codecs import TextGenerationCodec
from pipeserve.server.adapters.kserve_inference import parse_version, split_parameters
from pipeserve.server.adapters.kserve_signature import check_parameters
from pipeserve.server.control_plane import ControlPlane, ModelDescription
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, PipeserveError

log = logging.getLogger("pipeserve.http")

# Triton's vLLM backend's names for what else a response may carry, and the output field of each.
_RETURN_FLAGS = {"return_finish_reason": "finish_reason", "return_num_input_tokens": "num_input_tokens",
                 "return_num_output_tokens": "num_output_tokens"}
# Names other Triton generation backends give parameters pipeserve knows by another name.
_ALIASES = {"max_tokens": "max_new_tokens", "stop": "stop_sequences"}


class GenerateRequest:
    """A checked generate request: the prompt, the task's parameters, what to return besides the text."""

    def __init__(self, model: ModelDescription, codec: TextGenerationCodec, doc: Any):
        doc = dict(json_object(doc, "body"))
        prompt = doc.pop("text_input", None)
        if not isinstance(prompt, str):
            raise InvalidArgument("text_input", "must be the prompt, a string" if prompt is not None else
                                  "is required: the prompt, a string")
        params = dict(json_object(doc.pop("parameters", None) or {}, "parameters"))
        known = sorted({*(codec.signature.parameters or {}), *_ALIASES, *_RETURN_FLAGS} - {"stream"})
        for key, value in doc.items():  # the rest must be generation parameters at the top level
            if key not in known:
                raise InvalidArgument(key, f"is not a field of a generate request; fields: text_input, parameters, "
                                      f"and the parameters {', '.join(known)}")
            params[key] = value
        for alias, name in _ALIASES.items():
            if alias in params:
                params.setdefault(name, params.pop(alias))
        self.returns = {field: bool(params.pop(flag)) for flag, field in _RETURN_FLAGS.items() if flag in params}
        params.pop("stream", None)  # the endpoint chooses: /generate answers once, /generate_stream streams
        params, self.priority, self.timeout, _ = split_parameters(params, None)
        check_parameters(codec.signature, params, model.task_name)
        self.prompt = prompt
        self.params = codec.parameters(params)

    def extras(self, finish_reason: str | None, prompt_tokens: int, generated_tokens: int) -> dict[str, Any]:
        values = {"finish_reason": finish_reason, "num_input_tokens": prompt_tokens,
                  "num_output_tokens": generated_tokens}
        return {field: values[field] for field, wanted in self.returns.items() if wanted}


class TritonGenerate:
    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane
        self.control = control
        self.codecs = CodecCache()
        self.generate = endpoint(plane.gate)(self._generate)
        self.generate_stream = endpoint(plane.gate)(self._generate_stream)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for path in MODEL_PATHS:
            routes.append(Route(f"{path}/generate", self.generate, methods=["POST"]))
            routes.append(Route(f"{path}/generate_stream", self.generate_stream, methods=["POST"]))
        return routes

    async def _request(self, request: Request) -> tuple[ModelDescription, int, GenerateRequest]:
        version = parse_version(request.path_params.get("version", ""))
        model = self.control.describe(request.path_params["model"], version)
        codec = self.codecs.get(model)
        if not isinstance(codec, TextGenerationCodec):
            raise InvalidArgument("model", f"{model.name!r} serves {model.task_name}; generate serves text-generation "
                                  f"models (use /v2/models/{model.name}/infer or /v1/pipelines/{model.task_name})")
        return model, version, GenerateRequest(model, codec, await json_body(request))

    async def _generate(self, request: Request) -> Response:
        model, version, generate = await self._request(request)
        served, results = await unless_disconnected(request, self.plane.infer(
            model.task_name, [generate.prompt], generate.params, model=model.name, version=version,
            timeout=generate.timeout, priority=generate.priority))
        sequences = results[0]
        texts = [s["generated_text"] for s in sequences]
        doc: dict[str, Any] = {"model_name": served.name, "model_version": str(served.version),
                               "text_output": texts[0] if len(texts) == 1 else texts}
        first = sequences[0]
        doc.update(generate.extras(first["finish_reason"], first["prompt_tokens"],
                                   sum(s["generated_tokens"] for s in sequences)))
        return JSONResponse(doc)

    async def _generate_stream(self, request: Request) -> Response:
        model, version, generate = await self._request(request)
        served, events = self.plane.stream(model.task_name, generate.prompt, generate.params, model=model.name,
                                           version=version, timeout=generate.timeout)
        head = {"model_name": served.name, "model_version": str(served.version)}
        # The first event before the response starts: a prompt the task refuses (too long, a bad
        # parameter found at tokenization) is still an HTTP 400, not an event.
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        return EventStream(self._events(head, generate, first, events))

    async def _events(self, head: dict[str, Any], generate: GenerateRequest, first: Any,
                      events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        # aclosing: however the response ends (the client gone too), the sequence stops now.
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            try:
                event = first
                while event is not None:
                    doc = {**head, "text_output": event.text}
                    if event.finish_reason is not None:
                        doc.update(generate.extras(event.finish_reason.value, event.prompt_tokens,
                                                   event.generated_tokens))
                    yield sse_data(doc)
                    event = await anext(events, None)
            except PipeserveError as exc:
                yield sse_data({"error": exc.message})
            except Exception as exc:
                log.error("generate_stream failed", exc_info=exc)
                yield sse_data({"error": error_message(exc)})


def routes(plane: DataPlane, control: ControlPlane) -> list[BaseRoute]:
    return TritonGenerate(plane, control).routes()
