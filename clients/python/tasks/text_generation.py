from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeserve.client.tasks.base import TaskCodec, as_list
from pipeserve.v1 import text_generation_pb2 as pb
from pipeserve.v1 import text_generation_pb2_grpc as pb_grpc

_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    pb.FINISH_REASON_CANCELLED: "cancelled",
}
# Call parameters that go into GenerationParameters, by their transformers names.
_SCALARS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
_REQUEST = ("return_full_text", "num_return_sequences")
_KNOWN = frozenset(_SCALARS + _REQUEST + ("stop_sequence", "stop_sequences", "logprobs", "top_logprobs"))


@dataclass
class GenerationEvent:
    """One message of a text-generation stream: the tokens generated since the previous one.

    Concatenated, the `text` of the events is the generated text. The last event has
    `finish_reason` ("length", "eos", "stop_sequence" or "cancelled"), `usage` and
    `time_to_first_token` (seconds) set.
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


class TextGenerationCodec(TaskCodec):
    task = "text-generation"
    stub = pb_grpc.TextGenerationServiceStub
    method = "Generate"

    @staticmethod
    def parameters(params: dict[str, Any]) -> pb.GenerationParameters:
        unknown = sorted(set(params) - _KNOWN)
        if unknown:
            raise TypeError(f"text-generation got unknown parameters {unknown}; known: {sorted(_KNOWN)}")
        message = pb.GenerationParameters()
        for name in _SCALARS:
            if params.get(name) is not None:
                setattr(message, name, params[name])
        stops = params.get("stop_sequences", params.get("stop_sequence"))
        if stops:
            message.stop_sequences.extend([stops] if isinstance(stops, str) else stops)
        if params.get("logprobs"):
            message.logprobs = True
            message.top_logprobs = params.get("top_logprobs") or 0
        return message

    def build(self, inputs: Any, params: dict[str, Any]) -> pb.GenerateRequest:
        items, _ = as_list(inputs)
        request = pb.GenerateRequest(model=self.model, inputs=items, parameters=self.parameters(params))
        for name in _REQUEST:
            if params.get(name) is not None:
                setattr(request, name, params[name])
        return request

    def shape(self, response: pb.GenerateResponse, inputs: Any, params: dict[str, Any]) -> Any:
        results = [[{"generated_text": s.generated_text} for s in r.sequences] for r in response.results]
        _, single = as_list(inputs)
        return results[0] if single else results

    # -- streaming -----------------------------------------------------------------------------

    def build_stream(self, prompt: str, params: dict[str, Any]) -> pb.GenerateStreamRequest:
        if not isinstance(prompt, str):
            raise TypeError(f"stream() takes one prompt string, got {type(prompt).__name__}")
        if any(params.get(name) is not None for name in _REQUEST):
            raise TypeError("stream() returns the new text of one sequence: return_full_text and "
                            "num_return_sequences do not apply")
        return pb.GenerateStreamRequest(model=self.model, input=prompt, parameters=self.parameters(params))

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
