"""text-generation: prompts or conversations in, transformers 5's pipeline results out.

Every keyword argument transformers' pipeline or generate() takes is sent by its name: the common
ones in GenerationParameters' own fields, any other in its `extra` object; the server checks them
all (INVALID_ARGUMENT naming an unknown or unservable one). What cannot cross a wire (callables,
models, streamers, tensors that are not plain lists) is a TypeError here, naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from pipeserve.client.tasks.base import TaskCodec
from pipeserve.client.tasks.generation import json_value, proto_parameters
from pipeserve.v1 import text_generation_pb2 as pb
from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc

_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}
# Request fields (not GenerationParameters').
_REQUEST = ("return_full_text", "num_return_sequences")
# pipeserve's own fields, handled here.
_OWN = ("stop_sequences", "logprobs", "top_logprobs")


@dataclass
class GenerationEvent:
    """One message of a text-generation stream: the tokens generated since the previous one.

    Concatenated, the `text` of the events is the generated text (for a conversation, the
    reply's). The last event has `finish_reason` ("length", "eos", "stop_sequence" or
    "cancelled"), `usage` and `time_to_first_token` (seconds) set.
    """

    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    time_to_first_token: float | None = None


def logprobs(items: Any) -> list[dict[str, Any]]:
    return [{"token_id": lp.token_id, "logprob": lp.logprob,
             "top": [{"token_id": t.token_id, "token": t.token, "logprob": t.logprob} for t in lp.top]}
            for lp in items]


def is_message(value: Any) -> bool:
    """transformers' is_valid_message: a dict with "role" and "content"."""
    return isinstance(value, dict) and "role" in value and "content" in value


def chat_inputs(inputs: Any) -> tuple[list[list[dict[str, Any]]] | None, bool]:
    """(the conversations, whether the call passed a single one), as transformers' pipeline tells
    a chat from prompts: a list whose first item is a message is one conversation, a list of such
    lists a batch of them. (None, _) for prompts."""
    if isinstance(inputs, (list, tuple)) and inputs:
        if is_message(inputs[0]):
            return [list(inputs)], True
        if all(isinstance(c, (list, tuple)) and c and is_message(c[0]) for c in inputs):
            return [list(c) for c in inputs], False
    return None, False


def chat_message(message: Any, where: str) -> pb.ChatMessage:
    if not isinstance(message, dict):
        raise TypeError(f"{where} must be a message dict with 'role' and 'content', got {type(message).__name__}")
    out = pb.ChatMessage(role=str(message.get("role", "")))
    content = message.get("content")
    others = {k: json_value(f"{where}.{k}", v) for k, v in message.items() if k not in ("role", "content")}
    if isinstance(content, str):
        out.content = content
    else:
        others["content"] = json_value(f"{where}.content", content)
    if others:
        json_format.ParseDict(others, out.fields)
    return out


def conversation(messages: list[Any], where: str) -> pb.Conversation:
    return pb.Conversation(messages=[chat_message(m, f"{where}[{i}]") for i, m in enumerate(messages)])


def as_message(message: pb.ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.HasField("fields"):
        out.update(json_format.MessageToDict(message.fields))
    return out


class TextGenerationCodec(TaskCodec):
    task = "text-generation"
    stub = pb_grpc.TextGenerationServiceStub
    method = "Generate"

    @staticmethod
    def parameters(params: dict[str, Any]) -> pb.GenerationParameters:
        params = {k: v for k, v in params.items() if k not in _REQUEST}
        stops = params.pop("stop_sequences", None)
        want_logprobs, top = params.pop("logprobs", None), params.pop("top_logprobs", None)
        message = proto_parameters(pb.GenerationParameters(), params, "text-generation")
        if stops:
            message.stop_sequences.extend([stops] if isinstance(stops, str) else stops)
        if want_logprobs:
            message.logprobs = True
            message.top_logprobs = top or 0
        return message

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.GenerateRequest:
        request = pb.GenerateRequest(model=self.model, parameters=self.parameters(params))
        chats, _ = chat_inputs(inputs)
        if chats is not None:
            request.conversations.extend(conversation(c, f"inputs[{i}]") for i, c in enumerate(chats))
        else:
            items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            for i, item in enumerate(items):
                if not isinstance(item, str):
                    raise TypeError(f"text-generation inputs[{i}] must be a prompt string or a conversation (a list "
                                    f"of {{'role', 'content'}} messages), got {type(item).__name__}")
            request.inputs.extend(items)
        for name in _REQUEST:
            if params.get(name) is not None:
                setattr(request, name, params[name])
        return request

    def shape(self, response: pb.GenerateResponse, inputs: Any, params: dict[str, Any]) -> Any:
        results = [[self.record(s) for s in r.sequences] for r in response.results]
        chats, single_chat = chat_inputs(inputs)
        single = single_chat if chats is not None else not isinstance(inputs, (list, tuple))
        return results[0] if single else results

    @staticmethod
    def record(sequence: pb.GeneratedText) -> dict[str, Any]:
        """transformers' record: {"generated_text": text or conversation} or {"generated_token_ids": ids}."""
        if sequence.generated_token_ids:
            return {"generated_token_ids": list(sequence.generated_token_ids)}
        if sequence.conversation:
            return {"generated_text": [as_message(m) for m in sequence.conversation]}
        return {"generated_text": sequence.generated_text}

    # -- streaming -----------------------------------------------------------------------------

    def build_stream(self, prompt: Any, params: dict[str, Any]) -> pb.GenerateStreamRequest:
        if any(params.get(name) is not None for name in _REQUEST):
            raise TypeError("stream() returns the new text of one sequence: return_full_text and "
                            "num_return_sequences do not apply")
        request = pb.GenerateStreamRequest(model=self.model, parameters=self.parameters(params))
        chats, single = chat_inputs(prompt)
        if chats is not None and single:
            request.conversation.CopyFrom(conversation(chats[0], "input"))
        elif isinstance(prompt, str):
            request.input = prompt
        else:
            raise TypeError(f"stream() takes one prompt string or one conversation, got {type(prompt).__name__}")
        return request

    @staticmethod
    def event(message: pb.GenerateStreamResponse) -> GenerationEvent:
        event = GenerationEvent(text=message.text, token_ids=list(message.token_ids),
                                logprobs=logprobs(message.logprobs))
        if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            event.finish_reason = _FINISH_REASONS.get(message.finish_reason, "unknown")
            event.usage = {"prompt_tokens": message.usage.prompt_tokens,
                           "generated_tokens": message.usage.generated_tokens}
            event.time_to_first_token = message.time_to_first_token_seconds
        return event
