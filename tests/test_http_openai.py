"""The OpenAI-compatible API, called with the official `openai` package (sync and asyncio) on the
real server's HTTP port: completions and chat (whole and streamed), embeddings, models, errors,
and a client that goes away mid-stream."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import transformers
from pipeserve.client import pipeline

from tests import gated_backend
from tests.conftest import server_settings
from tests.generation_helpers import PROMPTS, Reference, wait_until
from tests.model_folders import add_model
from tests.server_harness import ServerThread

TOKEN = "openai-test-token"
MODEL = "gpt2"
CHAT_MODEL = "gpt2-chat"
# One row and one waiting place: a third sequence is refused (429).
NARROW_MODEL = "gpt2-narrow"
# gpt2 behind the test gate (tests/gated_backend.py): the test decides when its steps run.
GATED_MODEL = "gpt2-gated"
EMBEDDER = "minilm"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default gpt2, gpt2-chat (a chat template) and minilm, gpt2 with one row, and gpt2 gated."""
    repo = tmp_path_factory.mktemp("openai-repo")
    for name in (MODEL, CHAT_MODEL, EMBEDDER):
        folder = add_model(repo, name, name)
        (folder / "config.pbtxt").write_text((model_repository / name / "config.pbtxt").read_text())
    add_model(repo, NARROW_MODEL, MODEL, task="text-generation",
              extra="generation { max_concurrent_sequences: 1 }\ndynamic_batching { max_queue_size: 1 }")
    gated = add_model(repo, GATED_MODEL, MODEL, task="text-generation")
    (gated / "config.pbtxt").write_text((gated / "config.pbtxt").read_text().replace('"eager"', '"gated"'))
    return repo


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    plugins = gated_backend.install_plugin(tmp_path_factory.mktemp("plugins"))
    sys.path.insert(0, str(plugins))
    running = ServerThread(server_settings(repository, http_port=0, auth_token=TOKEN)).start()
    yield running
    running.stop()
    sys.path.remove(str(plugins))


@pytest.fixture(scope="module")
def base_url(server: ServerThread) -> str:
    return f"http://127.0.0.1:{server.server.http_port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    with openai.OpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(base_url: str) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def http(base_url: str) -> httpx.Client:
    with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=60) as raw:
        yield raw


@pytest.fixture(scope="module")
def reference(model_repository: Path) -> Reference:
    return Reference(model_repository / MODEL)


def active_sequences(server: ServerThread, model: str = MODEL) -> int:
    """The model's sequences in the engine now (the ControlPlane's statistics)."""
    return server.call(lambda: sum(v.stats.active_sequences for v in server.server.control.statistics(model)))


def calls_in_flight(server: ServerThread) -> int:
    return server.call(lambda: server.server.plane.gate.in_flight)


def greedy(reference: Reference, prompt: str, tokens: int) -> str:
    return reference.text(reference.generate(prompt, max_new_tokens=tokens, do_sample=False))


# -- models -------------------------------------------------------------------------------------------


def test_models_lists_every_served_model_and_retrieves_one_by_name(client):
    listed = {m.id: m for m in client.models.list()}
    assert {MODEL, CHAT_MODEL, NARROW_MODEL, EMBEDDER} <= set(listed)
    assert listed[MODEL].owned_by == "pipeserve"
    assert client.models.retrieve(EMBEDDER).id == EMBEDDER
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


# -- completions ----------------------------------------------------------------------------------------


def test_a_greedy_completion_is_the_models_own_greedy_text_with_its_usage(client, reference):
    done = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    [choice] = done.choices
    assert choice.text == greedy(reference, PROMPTS[1], 8)
    assert (choice.index, choice.finish_reason, done.model, done.object) == (0, "length", MODEL, "text_completion")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(reference.ids(PROMPTS[1])), 8)
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8


def test_an_empty_model_name_picks_the_default_text_generation_model(client, reference):
    done = client.completions.create(model="", prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert done.model == MODEL
    assert done.choices[0].text == greedy(reference, PROMPTS[0], 4)


async def test_a_streamed_completion_adds_up_to_the_whole_one_and_ends_with_done(aclient, http):
    whole = await aclient.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=12, temperature=0)
    chunks = [c async for c in await aclient.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=12,
                                                                temperature=0, stream=True)]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)
    with http.stream("POST", "/completions", json={"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 3,
                                                   "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = [line for line in raw.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_include_usage_adds_a_last_chunk_with_the_usage_and_no_choices(client, reference):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *text_chunks, last = chunks
    assert last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(reference.ids(PROMPTS[2])), 6)
    assert all(c.usage is None for c in text_chunks)


def test_n_sampled_choices_with_a_seed_repeat_exactly_and_stream_the_same(client):
    ask = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 7}
    first = client.completions.create(**ask)
    again = client.completions.create(**ask)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert first.usage.completion_tokens == 30
    streamed = {0: "", 1: "", 2: ""}
    for chunk in client.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[i] for i in range(3)] == texts


def test_several_prompts_get_n_choices_each_numbered_prompt_by_prompt(client, reference):
    done = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=5, temperature=0.8, n=2, seed=1)
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    assert done.usage.prompt_tokens == len(reference.ids(PROMPTS[0])) + len(reference.ids(PROMPTS[1]))
    greedy_pair = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=5, temperature=0)
    assert [c.text for c in greedy_pair.choices] == [greedy(reference, p, 5) for p in PROMPTS[:2]]


def test_n_above_one_needs_sampling(client):
    with pytest.raises(openai.BadRequestError) as whole:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, n=2, temperature=0)
    assert whole.value.body["param"] == "n" and "temperature" in whole.value.body["message"]
    with pytest.raises(openai.BadRequestError) as streamed:
        client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3, n=2, stream=True)
    assert streamed.value.body["param"] == "n"


def test_a_stop_sequence_ends_the_text_before_it_whole_and_streamed(client, reference):
    text = greedy(reference, PROMPTS[3], 16)
    stop = text[5:8]  # three characters: usually more than one token, so it arrives over several deltas
    expected = text[:text.index(stop)]
    done = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert (done.choices[0].text, done.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_give_each_tokens_log_probability_and_the_likeliest_alternatives(client):
    done = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3)
    logprobs = done.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3 and logprob <= 0
        # Greedy: the chosen token is the likeliest alternative.
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
    if "\ufffd" not in "".join(logprobs.tokens):  # a token that is part of a character has no text of its own
        assert "".join(logprobs.tokens) == done.choices[0].text
    assert logprobs.text_offset[0] == 0
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3, stream=True) if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens] == logprobs.tokens
    assert [x for lp in streamed for x in lp.text_offset] == logprobs.text_offset


def test_echo_puts_the_prompt_before_the_completion(client, reference):
    done = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert done.choices[0].text == PROMPTS[0] + greedy(reference, PROMPTS[0], 4)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text


def test_extra_parameters_reach_the_task_by_their_transformers_names(client):
    done = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.9, seed=3,
                                     extra_body={"top_k": 5, "repetition_penalty": 1.3})
    same = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0.9, seed=3,
                                     extra_body={"top_k": 5, "repetition_penalty": 1.3})
    assert done.choices[0].text == same.choices[0].text


# -- chat ---------------------------------------------------------------------------------------------------


def test_a_chat_reply_is_the_assistant_message_the_task_writes_with_usage(client):
    done = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    [choice] = done.choices
    assert (choice.message.role, choice.finish_reason, done.object) == ("assistant", "length", "chat.completion")
    assert isinstance(choice.message.content, str) and choice.message.content
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    again = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_completion_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content


async def test_a_streamed_chat_reply_starts_with_the_role_and_adds_up_to_the_whole_one(client, aclient):
    whole = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = [c async for c in await aclient.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True})]
    *deltas, last = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == whole.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage.completion_tokens == 10


def test_chat_logprobs_and_n_sampled_choices(client):
    done = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=2)
    content = done.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    if "\ufffd" not in "".join(t.token for t in content):
        assert "".join(t.token for t in content) == done.choices[0].message.content
    sampled = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=2,
                                           seed=4)
    assert sorted(c.index for c in sampled.choices) == [0, 1]


def test_a_model_without_a_chat_template_refuses_a_conversation(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert "template" in refused.value.body["message"]


def test_chat_refuses_what_it_cannot_serve_naming_the_parameter(client):
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=2, **extra)
        assert refused.value.body["param"] == param, extra
    for messages, param in [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
        ([{"role": "tool", "content": "42", "tool_call_id": "a"}], "messages[0].role"),
        ([], "messages"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=CHAT_MODEL, messages=messages, max_tokens=2)
        assert refused.value.body["param"] == param, messages


# -- embeddings ------------------------------------------------------------------------------------------------


def grpc_embeddings(server: ServerThread, texts: list[str]) -> np.ndarray:
    with pipeline("feature-extraction", EMBEDDER, target=server.target, token=TOKEN) as embed:
        return np.array(embed(texts, pooling="mean", normalize=True), dtype=np.float32)


def test_embeddings_are_the_feature_extraction_vectors_as_floats_and_as_base64(client, http, server, model_repository):
    texts = [PROMPTS[1], PROMPTS[3]]
    expected = grpc_embeddings(server, texts)
    as_floats = client.embeddings.create(model=EMBEDDER, input=texts, encoding_format="float")
    assert [d.index for d in as_floats.data] == [0, 1] and as_floats.model == EMBEDDER
    # usage counts the tokens the model read, special tokens included, as the tokenizer makes them.
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_repository / EMBEDDER)
    tokens = sum(len(tokenizer(text)["input_ids"]) for text in texts)
    assert (as_floats.usage.prompt_tokens, as_floats.usage.total_tokens) == (tokens, tokens)
    np.testing.assert_allclose(np.array([d.embedding for d in as_floats.data]), expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=1), 1.0, atol=1e-5)
    # The openai package asks for base64 by default and decodes it to floats itself.
    by_default = client.embeddings.create(model=EMBEDDER, input=texts)
    np.testing.assert_allclose(np.array([d.embedding for d in by_default.data]), expected, atol=1e-6)
    raw = http.post("/embeddings", json={"model": EMBEDDER, "input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    # One text alone pads differently from the pair: equal within float32 rounding.
    np.testing.assert_allclose(decoded, expected[0], atol=1e-6)
    assert client.embeddings.create(model="", input="one text").model == EMBEDDER


def test_embeddings_refuse_token_arrays_and_other_dimensions(client):
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model=EMBEDDER, input=[[101, 7592, 102]])
    assert tokens.value.body["param"] == "input" and "text" in tokens.value.body["message"]
    with pytest.raises(openai.BadRequestError) as dims:
        client.embeddings.create(model=EMBEDDER, input="hi", dimensions=128)
    assert dims.value.body["param"] == "dimensions" and "384" in dims.value.body["message"]
    assert len(client.embeddings.create(model=EMBEDDER, input="hi", dimensions=384).data[0].embedding) == 384


# -- errors ------------------------------------------------------------------------------------------------------


def test_errors_come_in_openais_shape_with_the_right_status(client, base_url, http):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    assert unknown.value.body["code"] == "model_not_found" and MODEL in unknown.value.body["message"]
    with pytest.raises(openai.BadRequestError) as wrong_task:
        client.completions.create(model=EMBEDDER, prompt="x")
    assert "feature-extraction" in wrong_task.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert bad.value.body["param"] == "max_tokens" and bad.value.body["message"].startswith("max_tokens:")
    assert bad.value.body["type"] == "invalid_request_error"
    for extra, param in [({"temperature": "hot"}, "temperature"), ({"frequency_penalty": 1.0}, "frequency_penalty"),
                         ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                         ({"extra_body": {"colour": "red"}}, "colour"), ({"prompt": [1, 2, 3]}, "prompt"),
                         ({"stop": [""]}, "stop[0]"), ({"seed": -1}, "seed")]:
        ask = {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**ask)
        assert refused.value.body["param"] == param, extra
    with openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0) as stranger, \
            pytest.raises(openai.AuthenticationError) as denied:
        stranger.models.list()
    assert denied.value.body["type"] == "authentication_error"
    not_json = http.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
    form = http.post("/completions", content=b"prompt=x", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]["message"]


def test_a_prompt_too_long_for_the_model_fails_before_the_stream_starts(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hello " * 600, max_tokens=2, stream=True)
    assert refused.value.body["param"] == "prompt" and "tokens" in refused.value.body["message"]


async def test_a_full_queue_is_429(server, aclient):
    running = await aclient.completions.create(model=NARROW_MODEL, prompt=PROMPTS[0], max_tokens=400,
                                               temperature=0, stream=True)
    async with running:
        await anext(aiter(running))
        waiting = asyncio.create_task(aclient.completions.create(model=NARROW_MODEL, prompt=PROMPTS[1], max_tokens=2))
        await asyncio.to_thread(wait_until, lambda: active_sequences(server, NARROW_MODEL) == 2, what="one waiting")
        with pytest.raises(openai.RateLimitError) as refused:
            await aclient.completions.create(model=NARROW_MODEL, prompt=PROMPTS[2], max_tokens=2)
        assert refused.value.body["code"] == "rate_limit_exceeded"
    assert (await waiting).usage.completion_tokens == 2


# -- streams that end early ------------------------------------------------------------------------------------


def generated_tokens(server: ServerThread, model: str) -> int:
    return server.call(lambda: sum(v.stats.generated_tokens for v in server.server.control.statistics(model)))


def engine_sequences(server: ServerThread, model: str) -> int:
    """The engine's own count now (the statistics take it at the engine's next step)."""
    return server.call(lambda: server.server.registry.get(model).runtime.engine.active_sequences)


async def test_a_client_that_goes_away_mid_stream_cancels_its_sequence(server, aclient, http):
    # The gated model's steps wait at the test's gate, so that a sequence is still running when its
    # client goes away however fast the machine decodes: the steps that make the events the
    # client reads pass, the next one waits until the client has gone.
    gate = gated_backend.gate(GATED_MODEL)
    before = generated_tokens(server, GATED_MODEL)
    gate.close(after=2)  # the prompt's step and one decode step
    try:
        stream = await aclient.completions.create(model=GATED_MODEL, prompt=PROMPTS[2], max_tokens=500,
                                                  temperature=0, stream=True)
        chunks = aiter(stream)
        await anext(chunks)
        await anext(chunks)
        await asyncio.to_thread(wait_until, lambda: engine_sequences(server, GATED_MODEL) == 1, 5.0, "the sequence held")
        await stream.close()
        # The close reaches the engine as a cancellation; the step held at the gate then drops it.
        await asyncio.to_thread(wait_until, lambda: calls_in_flight(server) == 0, what="the call left the drain gate")
    finally:
        gate.open()
    await asyncio.to_thread(wait_until, lambda: engine_sequences(server, GATED_MODEL) == 0, what="the sequence cancelled")
    assert generated_tokens(server, GATED_MODEL) - before < 10
    # The same with several choices of a raw stream, closed after its first event.
    before = generated_tokens(server, GATED_MODEL)
    gate.close(after=1)  # the three prompts' step: each choice's first token
    try:
        with http.stream("POST", "/completions", json={"model": GATED_MODEL, "prompt": PROMPTS[2], "max_tokens": 500,
                                                       "n": 3, "temperature": 1.0, "stream": True}) as raw:
            first = next(raw.iter_lines())
            assert json.loads(first.removeprefix("data: "))["choices"]
            wait_until(lambda: engine_sequences(server, GATED_MODEL) == 3, 5.0, "the three sequences held")
        await asyncio.to_thread(wait_until, lambda: calls_in_flight(server) == 0, what="the call left the drain gate")
    finally:
        gate.open()
    await asyncio.to_thread(wait_until, lambda: engine_sequences(server, GATED_MODEL) == 0,
                            what="the three sequences cancelled")
    assert generated_tokens(server, GATED_MODEL) - before < 3 * 10


def test_while_draining_new_calls_get_503_and_a_stream_in_flight_finishes(repository):
    draining = ServerThread(server_settings(repository, http_port=0, load_models=[MODEL])).start()
    try:
        base = f"http://127.0.0.1:{draining.server.http_port}/v1"
        with openai.OpenAI(base_url=base, api_key="any", max_retries=0) as sdk:
            stream = sdk.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=200, temperature=0, stream=True)
            chunks = iter(stream)
            next(chunks)
            stopping = asyncio.run_coroutine_threadsafe(draining.server.stop(grace=30), draining.loop)
            wait_until(lambda: draining.call(lambda: draining.server.plane.gate.draining), what="draining")
            with pytest.raises(openai.APIStatusError) as refused:
                sdk.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert refused.value.status_code == 503
            assert refused.value.body["type"] == "server_error"
            rest = list(chunks)
            assert rest[-1].choices[0].finish_reason == "length"
            stopping.result(30)
    finally:
        draining.stop()


def test_the_readmes_openai_example_runs_as_written(base_url):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    begin = readme.index("```python", readme.index("<!-- openai-example -->")) + len("```python")
    code = readme[begin:readme.index("```", begin)]
    namespace: dict = {}
    exec(code.replace('"http://localhost:8000/v1"', repr(base_url))  # noqa: S102 - our own README
         .replace('"unused-without-auth-token"', repr(TOKEN)), namespace)
    assert namespace["done"].model == MODEL and namespace["done"].usage.completion_tokens == 16
    assert len(namespace["vectors"].data) == 2 and len(namespace["vectors"].data[0].embedding) == 384
