"""The OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings.

A thin adapter like the gRPC ones: OpenAI's JSON becomes the text-generation and
feature-extraction tasks' inputs and parameters (`openai_params`), goes through the DataPlane
(`infer`, or `stream` for `stream: true`), and the results become OpenAI's objects
(`openai_responses`); a stream is server-sent events (http/sse.py) ending `data: [DONE]`, the
choices of a request merged into one stream (`openai_streaming`).
Chat messages go to the task as they are: the task applies the model's chat template.
Model listings come from the ControlPlane. Errors are OpenAI's JSON error shape (`openai_errors`).

`model` names a served model; empty (or left out) picks the endpoint's task's default model, as an
empty model name does over gRPC.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from pipeserve.server.adapters.http.errors import endpoint, json_body, json_object, openai_error
from pipeserve.server.adapters.http.openai_errors import error_event, error_response
from pipeserve.server.adapters.http.openai_params import (
    GenerationRequest,
    chat_request,
    completion_request,
    embedding_request,
)
from pipeserve.server.adapters.http.openai_responses import (
    ChatShape,
    CompletionShape,
    StopHoldBack,
    embeddings,
    finish_reason,
    new_id,
    now,
    response,
    token_text,
    usage,
    without_stop,
)
from pipeserve.server.adapters.http.openai_streaming import merged
from pipeserve.server.adapters.http.sse import EventStream, sse_data
from pipeserve.server.control_plane import ControlPlane
from pipeserve.server.dataplane import DataPlane
from pipeserve.server.errors import InvalidArgument, PipeserveError
from pipeserve.server.generation.outputs import TokenEvent

GENERATION_TASK = "text-generation"
EMBEDDING_TASK = "feature-extraction"
# What /v1/embeddings asks of feature-extraction unless the model's config.pbtxt defaults say
# otherwise: one vector per input, the tokens' mean (as sentence-transformers models such as
# all-MiniLM-L6-v2 pool), of length 1 (as OpenAI's embeddings are).
EMBEDDING_POOLING = "mean"
POOLED = ("mean", "cls", "max")
# The event that ends every OpenAI stream.
DONE = b"data: [DONE]\n\n"

Shape = CompletionShape | ChatShape


def routes(plane: DataPlane, control: ControlPlane) -> list[BaseRoute]:
    api = OpenAIRoutes(plane, control)

    def route(path: str, method: Callable[[Request], Awaitable[Response]], verb: str) -> Route:
        return Route(path, endpoint(plane.gate, openai_error)(openai_errors(method)), methods=[verb])

    return [
        route("/v1/models", api.list_models, "GET"),
        route("/v1/models/{model:path}", api.get_model, "GET"),
        route("/v1/completions", api.completions, "POST"),
        route("/v1/chat/completions", api.chat_completions, "POST"),
        route("/v1/embeddings", api.embeddings, "POST"),
    ]


def openai_errors(method: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Typed errors as OpenAI's error objects, with the parameter they are about (`param`);
    http/errors.py's `endpoint` around it keeps the drain gate (a stream holds its place until its
    response closes), the log line, and answers the rest (HttpError, 500) in OpenAI's shape too."""

    @functools.wraps(method)
    async def wrapper(request: Request) -> Response:
        try:
            return await method(request)
        except PipeserveError as exc:
            return error_response(exc)

    return wrapper


async def request_object(request: Request) -> dict[str, Any]:
    """The request's JSON object (415 for another content type, 400 for what does not parse)."""
    return json_object(await json_body(request), "body")


@dataclass
class StreamedChoice:
    """What a streamed choice has sent so far."""

    hold: StopHoldBack
    # The text sent so far, in characters: completions' logprobs text_offset.
    offset: int = 0
    started: bool = False
    counts: tuple[int, int] = (0, 0)  # prompt and generated tokens, from the last event


@dataclass
class StreamContext:
    request: GenerationRequest
    shape: Shape
    model: str
    id: str
    created: int


class OpenAIRoutes:
    def __init__(self, plane: DataPlane, control: ControlPlane):
        self.plane = plane
        self.control = control
        # Models have no creation time here; the listing reports when the server started.
        self.created = now()

    # -- models -------------------------------------------------------------------------------------

    async def list_models(self, request: Request) -> Response:
        newest = {s.name: s for s in self.control.versions(ready_only=True)}  # sorted: the last is the newest
        return JSONResponse({"object": "list", "data": [self._model(s.name, s.task) for s in newest.values()]})

    async def get_model(self, request: Request) -> Response:
        description = self.control.describe(request.path_params["model"])
        return JSONResponse(self._model(description.name, description.task_name))

    def _model(self, name: str, task: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "pipeserve", "task": task}

    # -- generation ---------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(completion_request(await request_object(request)), CompletionShape())

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(chat_request(await request_object(request)), ChatShape())

    async def _generate(self, req: GenerationRequest, shape: Shape) -> Response:
        try:
            if req.stream:
                return await self._stream(req, shape)
            served, results = await self.plane.infer(GENERATION_TASK, req.inputs, req.unary_params(), model=req.model)
        except InvalidArgument as exc:
            raise req.translate(exc) from None
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p, (item, sequences) in enumerate(zip(req.inputs, results)):
            prompt_tokens += sequences[0].get("prompt_tokens", 0)
            for i, result in enumerate(sequences):
                text = _reply(result["generated_text"])
                if result["finish_reason"] == "stop_sequence":
                    text = without_stop(text, req.stops)
                if req.echo:
                    text = item + text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = shape.logprobs(result["logprobs"], len(item) if req.echo else 0)
                choices.append(shape.choice(p * req.n + i, text, finish_reason(result["finish_reason"]), logprobs))
                completion_tokens += result.get("generated_tokens", 0)
        return JSONResponse(response(shape, served.name, choices, usage(prompt_tokens, completion_tokens)))

    async def _stream(self, req: GenerationRequest, shape: Shape) -> Response:
        """One engine stream per choice (prompt-major, as unary choices are numbered). The first
        event is awaited before the response starts, so that what fails at admission (a prompt
        longer than the model's context) is still an HTTP error, not an event."""
        streams: list[AsyncIterator[TokenEvent]] = []
        model = ""
        for item in req.inputs:
            for sample in range(req.n):
                served, events = self.plane.stream(GENERATION_TASK, item, req.stream_params(sample), model=req.model)
                model = served.name
                streams.append(events)
        events = merged(streams)
        try:
            first = await anext(events)
        except BaseException:
            await events.aclose()
            raise
        context = StreamContext(req, shape, model, new_id(shape.id_prefix), now())
        return EventStream(self._chunks(context, first, events))

    async def _chunks(self, context: StreamContext, first: tuple[int, TokenEvent],
                      events: AsyncGenerator[tuple[int, TokenEvent], None]) -> AsyncGenerator[bytes, None]:
        req, shape = context.request, context.shape
        choices = [StreamedChoice(StopHoldBack(req.stops)) for _ in range(len(req.inputs) * req.n)]
        try:
            if req.echo:
                for index, choice in enumerate(choices):
                    prompt = req.inputs[index // req.n]
                    choice.offset = len(prompt)
                    yield self._chunk(context, [shape.chunk_choice(index, prompt, None, None, True)])
            item: tuple[int, TokenEvent] | None = first
            while item is not None:
                for chunk in self._event_chunks(context, choices, *item):
                    yield chunk
                item = await anext(events, None)
        except PipeserveError as exc:
            yield error_event(req.translate(exc) if isinstance(exc, InvalidArgument) else exc)
        else:
            if req.include_usage:
                prompt_tokens = sum(c.counts[0] for i, c in enumerate(choices) if i % req.n == 0)
                used = usage(prompt_tokens, sum(c.counts[1] for c in choices))
                yield self._chunk(context, [], used)
        finally:
            await events.aclose()
        yield DONE

    def _event_chunks(self, context: StreamContext, choices: list[StreamedChoice], index: int,
                      event: TokenEvent) -> list[bytes]:
        req, shape = context.request, context.shape
        choice = choices[index]
        text = choice.hold.push(event.text)
        finish = None
        if event.finish_reason is not None:
            text += choice.hold.finish(event.finish_reason.value)
            finish = finish_reason(event.finish_reason.value)
            choice.counts = (event.prompt_tokens, event.generated_tokens)
        logprobs = None
        if req.logprobs is not None and event.logprobs:
            logprobs = shape.logprobs(event.logprobs, choice.offset)
            choice.offset += sum(len(token_text(lp)) for lp in event.logprobs)
        chunks = []
        # A chat choice's first chunk carries the role, even before there is text.
        if text or logprobs or (isinstance(shape, ChatShape) and not choice.started):
            chunks.append(self._chunk(context, [shape.chunk_choice(index, text, None, logprobs, not choice.started)]))
            choice.started = True
        if finish is not None:
            chunks.append(self._chunk(context, [shape.chunk_choice(index, "", finish, None, False)]))
        return chunks

    @staticmethod
    def _chunk(context: StreamContext, choices: list[dict], used: dict | None = None) -> bytes:
        body: dict[str, Any] = {"id": context.id, "object": context.shape.chunk_object, "created": context.created,
                                "model": context.model, "choices": choices}
        if context.request.include_usage:
            body["usage"] = used
        return sse_data(body)

    # -- embeddings -----------------------------------------------------------------------------------

    async def embeddings(self, request: Request) -> Response:
        req = embedding_request(await request_object(request))
        # The model first, for its config's pooling defaults (an empty name: the task's default).
        served = self.control.describe_for_task(EMBEDDING_TASK, req.model)
        defaults = served.defaults
        pooling = defaults.get("pooling")
        params = {"pooling": pooling if pooling in POOLED else EMBEDDING_POOLING,
                  "normalize": defaults.get("normalize", True)}
        try:
            served, vectors = await self.plane.infer(EMBEDDING_TASK, req.inputs, params, model=served.name,
                                                     version=served.version)
        except InvalidArgument as exc:
            raise req.names.translate(exc) from None
        floats = [np.asarray(v.vector, dtype=np.float32).reshape(-1) for v in vectors]
        size = len(floats[0])
        if req.dimensions is not None and req.dimensions != size:
            raise InvalidArgument("dimensions", f"must be {size} for {served.name} (its embedding size) or left out: "
                                                "shortening embeddings is right only for models trained for it")
        data: list[Any]
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in floats]
        else:
            data = [v.tolist() for v in floats]
        tokens = sum(v.tokens for v in vectors)  # each input's tokens, special tokens included
        return JSONResponse(embeddings(served.name, data, {"prompt_tokens": tokens, "total_tokens": tokens}))


def _reply(generated: Any) -> str:
    """The new text of a result: a completion's string, or a conversation's last (assistant) message."""
    if isinstance(generated, list):
        return generated[-1]["content"] if generated else ""
    return generated
