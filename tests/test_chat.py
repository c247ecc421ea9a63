"""Conversations on text-generation: the model's chat template applied on the server, and what
transformers 5's text-generation pipeline returns (the conversation with the assistant's reply),
over the typed service, the SDK (sync and asyncio), streams, the data plane and KServe v2."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from pipeserve.client import aio, pipeline
from pipeserve.v1 import text_generation_pb2 as pb
from transformers import pipeline as hf_pipeline

from tests.generation_helpers import stub
from tests.rpc_errors import expect_invalid_argument

CHAT_MODEL = "gpt2-chat"
HI = [{"role": "user", "content": "Hi"}]
SYSTEM = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a server?"}]
PREFILL = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
DOCUMENTS = [{"title": "Servers", "text": "A server answers requests."}]


@pytest.fixture(scope="module")
def chat(target):
    with pipeline("text-generation", model=CHAT_MODEL, target=target) as remote:
        yield remote


@pytest.fixture(scope="module")
def theirs(model_repository):
    return hf_pipeline("text-generation", model=str(model_repository / CHAT_MODEL))


CASES = {
    "one conversation": (HI, {"max_new_tokens": 8}),
    "a system message": (SYSTEM, {"max_new_tokens": 8}),
    "a batch of conversations": ([HI, SYSTEM], {"max_new_tokens": 6}),
    "the reply's text only": (HI, {"max_new_tokens": 8, "return_full_text": False}),
    "continuing the assistant's message": (PREFILL, {"max_new_tokens": 6}),
    "continue_final_message false": (PREFILL, {"max_new_tokens": 6, "continue_final_message": False}),
    "tools and documents reach the template": (HI, {"max_new_tokens": 6, "tools": TOOLS, "documents": DOCUMENTS}),
    "content parts": ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], {"max_new_tokens": 6}),
    "beams": (SYSTEM, {"max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}),
    "a tool's answer": ([*HI, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "name": "weather"}], {"max_new_tokens": 6}),
    "max_length truncates the templated prompt": (SYSTEM, {"max_length": 12}),
    "sampling, seeded": (HI, {"do_sample": True, "max_new_tokens": 8}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conversations_get_what_transformers_pipeline_returns(chat, theirs, name):
    import torch

    inputs, kwargs = CASES[name]
    seed = {"seed": 3} if kwargs.get("do_sample") else {}
    if seed:
        torch.manual_seed(3)
    expected = theirs(inputs, **kwargs)
    assert chat(inputs, **kwargs, **seed) == expected


async def test_the_asyncio_pipeline_takes_conversations_too(target, theirs):
    async with aio.pipeline("text-generation", model=CHAT_MODEL, target=target) as remote:
        assert await remote(SYSTEM, max_new_tokens=6) == theirs(SYSTEM, max_new_tokens=6)
        events = [e async for e in remote.stream(SYSTEM, max_new_tokens=6)]
    reply = theirs(SYSTEM, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert "".join(e.text for e in events) == reply


def test_a_streamed_conversation_carries_the_replys_text(chat, theirs):
    for messages in (SYSTEM, PREFILL):
        events = list(chat.stream(messages, max_new_tokens=10))
        reply = theirs(messages, max_new_tokens=10, return_full_text=False)[0]["generated_text"]
        assert "".join(e.text for e in events) == reply
        assert events[-1].finish_reason in ("length", "eos")


def test_a_beam_search_stream_comes_as_one_message_with_the_whole_reply(chat, theirs):
    events = list(chat.stream(SYSTEM, max_new_tokens=6, num_beams=3))
    assert len(events) == 1 and events[0].finish_reason in ("length", "eos")
    assert events[0].text == theirs(SYSTEM, max_new_tokens=6, num_beams=3, return_full_text=False)[0]["generated_text"]


def test_the_data_plane_answers_conversations_as_the_openai_endpoint_expects(server, theirs):
    """The contract the OpenAI chat endpoint builds on: DataPlane.infer takes [messages] and
    returns [[{"generated_text": [...messages, {"role": "assistant", "content": reply}], ...}]];
    DataPlane.stream takes the messages and streams the reply's text."""
    plane = server.server.plane

    async def run():
        _, results = await plane.infer("text-generation", [SYSTEM], {"max_new_tokens": 6}, model=CHAT_MODEL)
        _, events = plane.stream("text-generation", SYSTEM, {"max_new_tokens": 6}, model=CHAT_MODEL)
        return results, "".join([e.text async for e in events])

    results, streamed = server.run(run())
    expected = theirs(SYSTEM, max_new_tokens=6)
    assert [[{"generated_text": r["generated_text"]} for r in per_input] for per_input in results] == [expected]
    assert results[0][0]["generated_text"][-1]["role"] == "assistant"
    assert streamed == results[0][0]["generated_text"][-1]["content"]


def test_kserve_v2_takes_conversations_as_json_messages(target, theirs):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("MESSAGES", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps(HI).encode(), json.dumps(SYSTEM).encode()], dtype=object))
    result = client.infer(CHAT_MODEL, [tensor], parameters={"max_new_tokens": 6, "tools": json.dumps(TOOLS)})
    expected = theirs([HI, SYSTEM], max_new_tokens=6, tools=TOOLS)
    conversations = [[json.loads(c) for c in row] for row in result.as_numpy("CONVERSATION")]
    assert conversations == [[r["generated_text"] for r in per_input] for per_input in expected]
    replies = result.as_numpy("GENERATED_TEXT")
    assert [row[0].decode() for row in replies] == [per_input[0]["generated_text"][-1]["content"]
                                                    for per_input in expected]


def test_a_model_without_a_chat_template_says_so(target):
    with grpc.insecure_channel(target) as channel:
        details = expect_invalid_argument(lambda: stub(channel).Generate(pb.GenerateRequest(
            conversations=[pb.Conversation(messages=[pb.ChatMessage(role="user", content="Hi")])])), "inputs[0]")
    assert "no chat template" in details


@pytest.mark.parametrize("messages, field", [
    ([{"role": "wizard", "content": "Hi"}], "inputs[0][0].role"),
    ([{"role": "user", "content": 5}], "inputs[0][0].content"),
    ([{"role": "user", "content": [{"text": "no type"}]}], "inputs[0][0].content[0]"),
    ([{"role": "user", "content": "Hi"}, "not a message"], "inputs[0][1]"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "inputs[0][1].content"),
    ([{"content": "Hi"}], "inputs[0][0].role"),
    ([], "inputs[0]"),
    ([[{"role": "user", "content": "Hi"}]], "inputs[0][0]"),
])
def test_malformed_conversations_are_invalid_argument_naming_the_message(server, messages, field):
    from pipeserve.server.errors import InvalidArgument

    async def send():
        return await server.server.plane.infer("text-generation", [messages], {}, model=CHAT_MODEL)

    with pytest.raises(InvalidArgument) as info:
        server.run(send())
    assert str(info.value).startswith(f"{field}: "), str(info.value)


def test_an_unknown_role_over_grpc_is_invalid_argument(target):
    with grpc.insecure_channel(target) as channel:
        expect_invalid_argument(lambda: stub(channel).Generate(pb.GenerateRequest(
            model=CHAT_MODEL, conversations=[pb.Conversation(messages=[pb.ChatMessage(role="wizard", content="Hi")])])),
            "inputs[0][0].role")


def test_a_conversation_over_kserve_with_a_bad_message_names_it(target):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(target)
    tensor = triton.InferInput("MESSAGES", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([json.dumps([{"role": "user", "content": "Hi"}, "not a message"]).encode()],
                                        dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer(CHAT_MODEL, [tensor])
    assert "inputs[0][1]" in info.value.message() and "StatusCode.INVALID_ARGUMENT" in str(info.value.status())


def test_prompts_and_conversations_together_are_refused(target):
    with grpc.insecure_channel(target) as channel:
        expect_invalid_argument(lambda: stub(channel).Generate(pb.GenerateRequest(
            model=CHAT_MODEL, inputs=["Hi"],
            conversations=[pb.Conversation(messages=[pb.ChatMessage(role="user", content="Hi")])])), "conversations")
        expect_invalid_argument(lambda: stub(channel).Generate(pb.GenerateRequest(
            model=CHAT_MODEL, conversations=[pb.Conversation()])), "conversations[0]")
