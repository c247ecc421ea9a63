"""Conversations for text-generation, as transformers 5's TextGenerationPipeline takes them.

An input is a prompt string or a conversation: a list of messages, each a dict with "role" and
"content" (a string, or a list of content parts), and whatever else the model's chat template reads
(tool_calls, name, tool_call_id, ...). The server applies the model's chat template
(`tokenizer.apply_chat_template`, with the request's tools and documents) and answers with the
conversation plus the assistant's reply, or with the reply's text alone (return_full_text false);
a conversation that ends with an assistant message is continued (continue_final_message).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pipeserve.server.errors import InvalidArgument

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 1024

# apply_chat_template arguments a request may not set through tokenizer_encode_kwargs: the task
# sets them (the output form, the template itself, the parameters that have their own name).
_TEMPLATE_CONTROLS = frozenset({
    "conversation", "chat_template", "tokenize", "return_dict", "return_tensors", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "tools", "documents", "add_generation_prompt", "continue_final_message",
})


def is_message(value: Any) -> bool:
    """transformers' is_valid_message: a dict with "role" and "content"."""
    return isinstance(value, Mapping) and "role" in value and "content" in value


def is_conversation(value: Any) -> bool:
    """An input that transformers' pipeline reads as a chat (a list whose first item is a message)."""
    return isinstance(value, (list, tuple)) and bool(value) and is_message(value[0])


def check_conversation(field: str, conversation: Any) -> list[dict[str, Any]]:
    """The messages of a conversation, each checked: its shape, a known role, text content."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InvalidArgument(field, "must be a prompt string or a non-empty list of {\"role\", \"content\"} messages")
    if len(conversation) > MAX_MESSAGES:
        raise InvalidArgument(field, f"has {len(conversation)} messages; at most {MAX_MESSAGES}")
    messages = []
    for i, message in enumerate(conversation):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidArgument(where, f"must be a message object with \"role\" and \"content\", got {message!r}")
        for key in ("role", "content"):
            if key not in message:
                raise InvalidArgument(f"{where}.{key}", "is required")
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidArgument(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = message["content"]
        if content is not None and not isinstance(content, (str, list)):
            raise InvalidArgument(f"{where}.content", f"must be a string or a list of content parts, got {content!r}")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                    raise InvalidArgument(f"{where}.content[{j}]", "must be an object with a \"type\" (e.g. "
                                          "{\"type\": \"text\", \"text\": ...})")
        messages.append(dict(message))
    return messages


def check_template_kwargs(value: Any) -> dict[str, Any]:
    """tokenizer_encode_kwargs for a conversation: template variables (e.g. enable_thinking) and
    tokenizer options; not the arguments the task sets itself."""
    if not isinstance(value, Mapping):
        raise InvalidArgument("tokenizer_encode_kwargs", f"must be an object, got {value!r}")
    for key in value:
        if key in _TEMPLATE_CONTROLS:
            raise InvalidArgument(f"tokenizer_encode_kwargs.{key}",
                                  "is set by the server (the model's template, token ids out; tools, documents and "
                                  "continue_final_message have parameters of their own)")
    return dict(value)


def continues(messages: Sequence[Mapping[str, Any]], continue_final_message: bool | None) -> bool:
    """Whether the reply continues the last message: as asked, else when the last is the assistant's."""
    if continue_final_message is None:
        return messages[-1]["role"] == "assistant"
    return continue_final_message


def replied(messages: Sequence[Mapping[str, Any]], text: str, continue_final_message: bool | None,
            reply: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The conversation with the reply: appended as the assistant's message, or added to the last
    message's content when the reply continues it (transformers' postprocess)."""
    messages = [dict(m) for m in messages]
    if continues(messages, continue_final_message):
        last = messages[-1]
        return messages[:-1] + [{"role": last["role"], "content": last["content"] + text}]
    return messages + [dict(reply) if reply is not None else {"role": "assistant", "content": text}]
