"""pipeserve.v1.TextGenerationService over the data plane: unary Generate and streaming GenerateStream."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from pipeserve.server.adapters.status import stream_rpc, timeout_of, unary_rpc
from pipeserve.server.adapters.task_service import TaskServicer
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
_OPTIONAL = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def parameters(message: pb.GenerationParameters) -> dict[str, Any]:
    """The parameters a request sets, by their transformers names (unset ones are left out)."""
    params: dict[str, Any] = {name: getattr(message, name) for name in _OPTIONAL if message.HasField(name)}
    if message.stop_sequences:
        params["stop_sequences"] = list(message.stop_sequences)
    if message.logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = message.top_logprobs
    return params


def logprobs(items: Sequence[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob) for t in lp.top])
            for lp in items]


class TextGenerationServicer(TaskServicer, pb_grpc.TextGenerationServiceServicer):
    task = TASK

    @unary_rpc(TASK)
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        params = parameters(request.parameters)
        if request.HasField("return_full_text"):
            params["return_full_text"] = request.return_full_text
        if request.HasField("num_return_sequences"):
            params["num_return_sequences"] = request.num_return_sequences
        results, answered = await self.infer(request, list(request.inputs), params, context)
        return pb.GenerateResponse(
            results=[pb.GeneratedSequences(sequences=[
                pb.GeneratedText(
                    generated_text=r["generated_text"], token_ids=r["token_ids"],
                    finish_reason=_FINISH_REASONS[r["finish_reason"]],
                    usage=pb.Usage(prompt_tokens=r["prompt_tokens"], generated_tokens=r["generated_tokens"]),
                    logprobs=logprobs(r["logprobs"]),
                ) for r in per_input]) for per_input in results],
            **answered,
        )

    @stream_rpc(TASK)
    async def GenerateStream(self, request: pb.GenerateStreamRequest, context):
        served, events = self.plane.stream(
            TASK, request.input, parameters(request.parameters), model=request.model,
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
