"""Typed errors in OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}` (rendered
by http/errors.py's `openai_error`, with the HTTP status every HTTP route gives the error's code),
with the OpenAI parameter (`param`) and code (`model_not_found`) that OpenAI's clients read.

Task errors name the task's parameters (`max_new_tokens`, `inputs[0]`); a client of this API sent
OpenAI's (`max_tokens`, `prompt`), so `FieldNames` renames them in the field and the message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from starlette.responses import Response

from pipeserve.server.adapters.http.errors import http_status, openai_error
from pipeserve.server.errors import InvalidArgument, ModelNotFound, PipeserveError

# OpenAI's codes where its API has one for the same case; otherwise the server's code, in lower case.
_CODES = {429: "rate_limit_exceeded"}


def error_response(exc: PipeserveError) -> Response:
    """A typed error in OpenAI's shape: its HTTP status, the OpenAI parameter it is about."""
    status = http_status(exc)
    param = exc.field if isinstance(exc, InvalidArgument) else None
    code = "model_not_found" if isinstance(exc, ModelNotFound) else _CODES.get(status) or exc.code.lower()
    return openai_error(status, exc.message, param=param, code=code)


def error_event(exc: PipeserveError) -> bytes:
    """The same error as a server-sent event, for a stream that fails after it began (the openai
    package raises it as an APIError)."""
    return b"data: " + bytes(error_response(exc).body) + b"\n\n"


@dataclass(frozen=True)
class FieldNames:
    """How the OpenAI request names what the task's errors call by the task's names.

    `renames`: task parameter -> OpenAI parameter. `inputs`: the OpenAI field that carried the
    inputs (`prompt`, `messages`, `input`). `indexed`: whether that field was a list, so that
    `inputs[2]` becomes `prompt[2]` (else `prompt`: the request had one input).
    """

    inputs: str
    indexed: bool = True
    renames: Mapping[str, str] = field(default_factory=dict)

    def field(self, name: str) -> str:
        for head in ("inputs", "input"):
            if name == head or name.startswith((f"{head}[", f"{head}.")):
                rest = name[len(head):]
                if not self.indexed and rest.startswith("[0]"):
                    rest = rest[3:]
                return self.inputs + rest
        head = re.match(r"[A-Za-z_]*", name).group()  # type: ignore[union-attr]
        return self.renames.get(head, head) + name[len(head):]

    def translate(self, exc: InvalidArgument) -> InvalidArgument:
        """The same error in the request's own names."""
        why = exc.why
        for ours, theirs in self.renames.items():
            why = re.sub(rf"\b{re.escape(ours)}\b", theirs, why)
        return InvalidArgument(self.field(exc.field), why)
