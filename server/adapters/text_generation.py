"""pipeserve.v1.TextGenerationService over the data plane: unary Generate and streaming GenerateStream."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from pipeserve.server.adapters.generation_parameters import message_parameters, struct_value
from pipeserve.server.adapters.status import stream_rpc, timeout_of, unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
from pipeserve.server.errors import InvalidArgument
from pipeserve.server.generation.outputs import TokenEvent, TokenLogprob
from pipeserve.v1 import text_generation_pb2 as pb
from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc

TASK = "text-generation"

_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def parameters(message: pb.GenerationParameters) -> dict[str, Any]:
    """The parameters a request sets, by their transformers names (unset ones are left out)."""
    params = message_parameters(message)
    if message.stop_sequences:
        params["stop_sequences"] = list(message.stop_sequences)
    if message.logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = message.top_logprobs
    return params


def conversation(message: pb.Conversation, field: str) -> list[dict[str, Any]]:
    """A Conversation as transformers' messages: {"role", "content", ...its other fields}."""
    if not message.messages:
        raise InvalidArgument(field, "has no messages")
    return [{"role": m.role, "content": m.content,
             **(struct_value(m.fields, f"{field}.messages[{i}].fields") if m.HasField("fields") else {})}
            for i, m in enumerate(message.messages)]


def chat_message(message: dict[str, Any]) -> pb.ChatMessage:
    out = pb.ChatMessage(role=str(message.get("role", "")))
    content = message.get("content")
    others = {k: v for k, v in message.items() if k not in ("role", "content")}
    if isinstance(content, str):
        out.content = content
    else:
        others["content"] = content
    if others:
        json_format.ParseDict(others, out.fields)
    return out


def logprobs(items: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in lp.top])
            for lp in items]


def generated(result: dict[str, Any]) -> pb.GeneratedText:
    """One sequence's result: its text, or the conversation with the reply, or its token ids."""
    message = pb.GeneratedText(
        token_ids=result["token_ids"], finish_reason=_FINISH_REASONS[result["finish_reason"]],
        usage=pb.Usage(prompt_tokens=result["prompt_tokens"], generated_tokens=result["generated_tokens"]),
        logprobs=logprobs(result["logprobs"]),
    )
    if "generated_token_ids" in result:
        message.generated_token_ids.extend(result["generated_token_ids"])
    elif isinstance(result["generated_text"], list):
        messages = result["generated_text"]
        message.conversation.extend(chat_message(m) for m in messages)
        last = messages[-1].get("content") if messages else ""
        message.generated_text = last if isinstance(last, str) else ""
    else:
        message.generated_text = result["generated_text"]
    return message


class TextGenerationServicer(TaskServicer, pb_grpc.TextGenerationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        params = parameters(request.parameters)
        if request.HasField("return_full_text"):
            params["return_full_text"] = request.return_full_text
        if request.HasField("num_return_sequences"):
            params["num_return_sequences"] = request.num_return_sequences
        if request.inputs and request.conversations:
            raise InvalidArgument("conversations", "are sent with inputs; send prompts or conversations, not both")
        inputs: list[Any] = list(request.inputs) or [
            conversation(c, f"conversations[{i}]") for i, c in enumerate(request.conversations)]
        results, answered = await self.infer(request, inputs, params, context)
        return pb.GenerateResponse(
            results=[pb.GeneratedSequences(sequences=[generated(r) for r in per_input]) for per_input in results],
            **answered,
        )

    @stream_rpc(TASK)
    async def GenerateStream(self, request: pb.GenerateStreamRequest, context):
        item: Any = request.input
        if request.HasField("conversation"):
            if request.input:
                raise InvalidArgument("conversation", "is sent with input; send a prompt or a conversation, not both")
            item = conversation(request.conversation, "conversation")
        served, events = self.plane.stream(
            TASK, item, parameters(request.parameters), model=request.model,
            version=request.model_version, timeout=timeout_of(context),
        )
        # aclosing: however this call ends (a cancelled client too), the sequence stops now.
        async with contextlib.aclosing(events):
            event: TokenEvent
            async for event in events:
                message = pb.GenerateStreamResponse(token_ids=event.token_ids, text=event.text,
                                                    logprobs=logprobs(event.logprobs))
                if event.finish_reason is not None:
                    message.finish_reason = _FINISH_REASONS[event.finish_reason.value]
                    message.usage.prompt_tokens = event.prompt_tokens
                    message.usage.generated_tokens = event.generated_tokens
                    message.time_to_first_token_seconds = event.time_to_first_token
                    message.model = served.name
                    message.model_version = served.version
                yield message
