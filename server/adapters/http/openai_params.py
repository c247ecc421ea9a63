"""OpenAI request bodies as the text-generation and feature-extraction tasks' inputs and parameters.

Every parameter OpenAI defines for an endpoint is here, in one of three places: mapped (to the
task's parameter of the same meaning), ignored (it changes no result: `user`), or refused where
it is set to anything but its no-op value, with the reason the client reads in its 400. A name
that is none of these is refused as unknown. Values are checked by the task (its messages, in
OpenAI's names: `FieldNames`); this module checks only what it branches on.

Unset sampling parameters resolve as the task resolves them (the model's generation_config, then
transformers' pipeline defaults), not to OpenAI's defaults (temperature 1, max_tokens 16): the
same prompt gets the same answer over gRPC, KServe and this API. `temperature: 0` is greedy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeserve.server.adapters.http.openai_errors import FieldNames
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.tasks.generation_checks import SEED_MAX
from pipeserve.server.tasks.text_generation_options import MAX_RETURN_SEQUENCES, MAX_TOP_LOGPROBS

_NO_PENALTY = ("is not supported: the engine has no additive penalties; repetition_penalty (transformers' "
               "multiplicative one, > 1 discourages repeats) is available as an extra parameter; send 0 or leave it out")
_TOOLS_WHY = ("tool calling needs replies parsed into tool calls, which this server does not do; describe the "
              "tools in a message instead")
_NO_TOOLS = f"is not supported: {_TOOLS_WHY}"

# Refused unless set to their no-op value (None, or what `_no_op` accepts): the reason says why.
COMMON_REFUSED: dict[str, str] = {
    "presence_penalty": _NO_PENALTY,
    "frequency_penalty": _NO_PENALTY,
    "logit_bias": "is not supported: the engine does not bias single tokens",
}
COMPLETION_REFUSED: dict[str, str] = {
    **COMMON_REFUSED,
    "suffix": "is not supported: text-generation continues a prompt, it does not fill in before a suffix",
    "best_of": "is supported only equal to n: ranking extra sequences by likelihood on the server is not done",
}
CHAT_REFUSED: dict[str, str] = {
    **COMMON_REFUSED,
    "tools": _NO_TOOLS,
    "functions": _NO_TOOLS,
    "tool_choice": _NO_TOOLS,
    "function_call": _NO_TOOLS,
    "response_format": "is supported only as {\"type\": \"text\"}: structured output needs the tokens constrained "
                       "to a grammar, which the engine does not do",
    "modalities": "is supported only as [\"text\"]: the served models write text",
    "audio": "is not supported: the served models write text",
    "prediction": "is not supported: predicted outputs are not used to speed up decoding",
    "reasoning_effort": "is not supported: the served models have no reasoning mode",
    "web_search_options": "is not supported: the server has no web search",
    "store": "is supported only as false: the server stores no completions",
}
_SAMPLE = "set temperature above 0 (left out, the model's generation config decides, and it may decode greedily)"
# Accepted and without effect on the result.
IGNORED = frozenset({"user", "metadata", "service_tier", "parallel_tool_calls"})


def _no_op(name: str, value: Any, body: Mapping[str, Any]) -> bool:
    """Whether a refused parameter is set to what changes nothing."""
    if value is None:
        return True
    match name:
        case "presence_penalty" | "frequency_penalty":
            return _number(value) and value == 0
        case "logit_bias" | "tools" | "functions":
            return not value
        case "suffix":
            return value == ""
        case "best_of":
            return value == (body.get("n") or 1)
        case "tool_choice":
            return value == "none" or value == "auto" and not body.get("tools")
        case "function_call":
            return value == "none"
        case "response_format":
            return value == {"type": "text"}
        case "modalities":
            return value == ["text"]
        case "store":
            return value is False
    return False


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationRequest:
    """A completions or chat request in the text-generation task's terms."""

    model: str
    # Prompts (completions), or one conversation of {"role", "content"} messages (chat).
    inputs: list[Any]
    # The task's parameters, for one sequence (`num_return_sequences` is set only for unary calls).
    params: dict[str, Any]
    n: int
    stream: bool
    include_usage: bool
    # Top alternatives per token; None: no log probabilities.
    logprobs: int | None
    stops: tuple[str, ...]
    names: FieldNames
    # completions' echo: the prompt comes before the completion.
    echo: bool = False

    def translate(self, exc: InvalidArgument) -> InvalidArgument:
        """A task's error in this request's names. The task refuses several sequences of greedy
        decoding in its own terms (do_sample, num_beams); OpenAI's way to sample is temperature."""
        if exc.field == "num_return_sequences":
            return InvalidArgument("n", f"above 1 needs sampling: {_SAMPLE}")
        return self.names.translate(exc)

    def unary_params(self) -> dict[str, Any]:
        return {**self.params, "num_return_sequences": self.n} if self.n != 1 else self.params

    def stream_params(self, sample: int) -> dict[str, Any]:
        """The parameters of the stream of choice `sample` of a prompt: choices of a seeded request
        take the seeds the task gives a unary call's sequences (seed + sample), so that streamed
        and unary choices are the same."""
        seed = self.params.get("seed")
        if sample and _integer(seed):
            return {**self.params, "seed": (seed + sample) % (SEED_MAX + 1)}
        return self.params


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    encoding_format: str
    dimensions: int | None
    names: FieldNames = field(default_factory=lambda: FieldNames("input"))


# -- completions and chat ---------------------------------------------------------------------------

_COMMON = ("model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "stop", "seed",
           "top_k", "repetition_penalty")
COMPLETION_FIELDS = frozenset({*_COMMON, "prompt", "echo", "logprobs", *COMPLETION_REFUSED, *IGNORED})
CHAT_FIELDS = frozenset({*_COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs", *CHAT_REFUSED,
                         *IGNORED})
# vLLM-compatible extras (the openai SDK's `extra_body`): the task's own sampling parameters.
EXTRAS = ("top_k", "repetition_penalty")


def _texts(body: Mapping[str, Any], field: str, noun: str) -> tuple[list[str], bool]:
    """The texts of a `prompt` or `input` field (a string or a list of strings), and whether it was
    a list (the answer then indexes its choices by it). Token ids are refused: the server tokenizes."""
    given = body.get(field)
    if isinstance(given, str):
        return [given], False
    if isinstance(given, list) and all(isinstance(t, str) for t in given):
        return list(given), True
    if isinstance(given, list) and all(_integer(t) or isinstance(t, list) for t in given):
        raise InvalidArgument(field, f"token id {noun} are not supported; send the text (the server tokenizes it "
                                     "with the model's own tokenizer)")
    if given is None:
        raise InvalidArgument(field, "is required: a string or a list of strings")
    raise InvalidArgument(field, f"must be a string or a list of strings, got {type(given).__name__}")


def completion_request(body: Mapping[str, Any]) -> GenerationRequest:
    """POST /v1/completions."""
    _check_fields(body, COMPLETION_FIELDS, COMPLETION_REFUSED)
    prompts, indexed = _texts(body, "prompt", "prompts")
    logprobs = body.get("logprobs")
    if logprobs is not None and not _integer(logprobs):
        raise InvalidArgument("logprobs", f"must be an integer (alternatives per token, 0 to {MAX_TOP_LOGPROBS}), "
                                          f"got {logprobs!r}")
    echo = _flag(body, "echo")
    if echo and logprobs is not None:
        raise InvalidArgument("echo", "with logprobs is not supported: it needs the prompt's log probabilities, "
                                      "which the engine does not compute")
    names = FieldNames("prompt", indexed, {"top_logprobs": "logprobs", **_renames("max_tokens")})
    return _generation(body, prompts, names, logprobs, echo=echo)


def chat_request(body: Mapping[str, Any]) -> GenerationRequest:
    """POST /v1/chat/completions: the conversation goes to the task as it is (role and text
    content of each message); the model's chat template is applied by the task."""
    _check_fields(body, CHAT_FIELDS, CHAT_REFUSED)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "is required: a non-empty list of {\"role\", \"content\"} messages")
    conversation = [_message(i, m) for i, m in enumerate(messages)]
    top = None
    if _flag(body, "logprobs"):
        top = body.get("top_logprobs")
        if top is None:
            top = 0
        elif not _integer(top):
            raise InvalidArgument("top_logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    elif body.get("top_logprobs") is not None:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    names = FieldNames("messages", False, _renames(limit))
    return _generation(body, [conversation], names, top, max_tokens=body.get(limit))


def _renames(max_tokens: str) -> dict[str, str]:
    return {"max_new_tokens": max_tokens, "max_length": max_tokens, "num_return_sequences": "n",
            "stop_sequences": "stop", "do_sample": "temperature"}


# OpenAI's roles; a developer message is what a system message was before (OpenAI's o1 models).
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidArgument(where, "must be an object with role and content")
    role = message.get("role")
    if role in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
        raise InvalidArgument(f"{where}.role", f"{role!r} messages and tool calls are not supported: {_TOOLS_WHY}")
    if role not in _ROLES:
        raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(_ROLES)}, got {role!r}")
    return {"role": _ROLES[role], "content": _content(where, message.get("content"))}


def _content(where: str, content: Any) -> str:
    """A message's text: a string, or text parts (joined by newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InvalidArgument(f"{where}.content[{i}]", f"only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                                               f"are supported: the served models read text, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise InvalidArgument(f"{where}.content", "must be a string or a list of text parts")


def _generation(body: Mapping[str, Any], inputs: list[Any], names: FieldNames, logprobs: int | None, *,
                echo: bool = False, max_tokens: Any = None) -> GenerationRequest:
    params: dict[str, Any] = {"return_full_text": False}
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if temperature is not None:
        if not _number(temperature):
            raise InvalidArgument("temperature", f"must be a number, got {temperature!r}")
        if temperature == 0:
            params["do_sample"] = False  # OpenAI's temperature 0: the likeliest token each step
        else:
            params["do_sample"], params["temperature"] = True, temperature
    elif top_p is not None:
        params["do_sample"] = True  # OpenAI samples whenever temperature is not 0
    if top_p is not None:
        params["top_p"] = top_p
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    for name in EXTRAS:
        if body.get(name) is not None:
            params[name] = body[name]
    stops = _stops(body.get("stop"))
    if stops:
        params["stop_sequences"] = list(stops)
    if logprobs is not None:
        params["logprobs"], params["top_logprobs"] = True, logprobs
    n = body.get("n")
    n = 1 if n is None else n
    if not _integer(n) or not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise InvalidArgument("n", f"must be an integer from 1 to {MAX_RETURN_SEQUENCES}, got {n!r}")
    stream = _flag(body, "stream")
    if stream and n > 1 and not params.get("do_sample"):
        raise InvalidArgument("n", f"above 1 in a stream needs sampling asked for: {_SAMPLE}")
    return GenerationRequest(
        model=_model(body), inputs=inputs, params=params, n=n, stream=stream,
        include_usage=_stream_options(body, stream), logprobs=logprobs, stops=stops, names=names, echo=echo,
    )


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InvalidArgument("stop", "must be a string or a list of strings")


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    """stream_options.include_usage: a last chunk with the usage and no choices."""
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidArgument("stream_options", "is only allowed with stream: true")
    if not isinstance(options, Mapping):
        raise InvalidArgument("stream_options", "must be an object")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise InvalidArgument(f"stream_options.{unknown[0]}", "is not supported; stream_options takes include_usage")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise InvalidArgument("stream_options.include_usage", "must be true or false")
    return bool(include)


# -- embeddings ---------------------------------------------------------------------------------------

EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
ENCODINGS = ("float", "base64")


def embedding_request(body: Mapping[str, Any]) -> EmbeddingRequest:
    """POST /v1/embeddings."""
    _check_fields(body, EMBEDDING_FIELDS, {})
    inputs, indexed = _texts(body, "input", "inputs")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise InvalidArgument("encoding_format", f"must be float or base64, got {encoding!r}")
    dimensions = body.get("dimensions")
    if dimensions is not None and not (_integer(dimensions) and dimensions > 0):
        raise InvalidArgument("dimensions", f"must be a positive integer, got {dimensions!r}")
    return EmbeddingRequest(_model(body), inputs, encoding, dimensions, FieldNames("input", indexed))


# -- shared ---------------------------------------------------------------------------------------------


def _check_fields(body: Mapping[str, Any], known: frozenset[str], refused: Mapping[str, str]) -> None:
    for name in body:
        if name not in known:
            raise InvalidArgument(name, "is not a parameter of this endpoint (see the README's OpenAI-compatible API "
                                        "table for what is served)")
    for name, why in refused.items():
        if name in body and not _no_op(name, body[name], body):
            raise InvalidArgument(name, why)


def _model(body: Mapping[str, Any]) -> str:
    """A served model's name; empty (or left out): the endpoint's task's default model."""
    model = body.get("model")
    if model is None:
        return ""
    if not isinstance(model, str):
        raise InvalidArgument("model", f"must be a string (a served model's name), got {model!r}")
    return model


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be true or false, got {value!r}")
    return value
