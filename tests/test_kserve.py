"""KServe v2 / Triton gRPC: tritonclient (sync, asyncio, streaming) against the real server.

Every default model is a v2 model with typed tensors; a custom task registered by entry point is
served with no code (by its base class's codec, or the generic JSON codec).
"""

from __future__ import annotations

import asyncio
import importlib
import io
import json
import queue
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from pipeserve.client import pipeline
from pipeserve.server.tasks import registry as task_registry
from pipeserve.server.tasks.base import TaskParams, TokenizingTask
from pipeserve.server.tasks.text_classification import TextClassificationTask
from tests.conftest import server_settings
from tests.model_folders import add_model
from tests.server_harness import ServerThread

TOLERANCE = 1e-5


def text_input(name: str, items: list, datatype: str = "BYTES") -> triton.InferInput:
    array = np.array(items, dtype=object if datatype == "BYTES" else None)
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@pytest.fixture(scope="module")
def client(target):
    with triton.InferenceServerClient(target) as c:
        yield c


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


# -- health, metadata, config -----------------------------------------------------------------------


def test_server_and_model_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("sentiment")
    assert client.is_model_ready("sentiment", "1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("sentiment", "7")
    metadata = client.get_server_metadata()
    assert metadata.name == "pipeserve"
    assert {"model_repository", "statistics", "model_configuration"} <= set(metadata.extensions)


def test_model_metadata_and_config_describe_the_tensors(client):
    metadata = client.get_model_metadata("sentiment")
    assert metadata.versions == ["1"] and metadata.platform == "pipeserve:text-classification"
    described = [(t.name, t.datatype, list(t.shape)) for t in (*metadata.inputs, *metadata.outputs)]
    assert described == [("TEXT", "BYTES", [-1]), ("TEXT_PAIR", "BYTES", [-1]), ("LABEL", "BYTES", [-1, -1]),
                         ("SCORE", "FP32", [-1, -1])]

    config = client.get_model_config("minilm").config
    assert config.name == "minilm" and config.backend == "eager" and config.max_batch_size == 0
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs["EMBEDDING"] == (triton.model_config_pb2.TYPE_FP32, [-1, 384])
    assert outputs["TOKEN_EMBEDDINGS"] == (triton.model_config_pb2.TYPE_FP32, [-1, -1, 384])
    assert config.input[0].data_type == triton.model_config_pb2.TYPE_STRING
    assert config.parameters["task"].string_value == "feature-extraction"
    assert not config.model_transaction_policy.decoupled


# -- inference: values equal the typed services', as numpy arrays -----------------------------------------


def test_classification_returns_labels_and_scores_equal_to_the_typed_service(client, target):
    texts = ["I love this", "this is awful", "meh"]
    result = client.infer("sentiment", [text_input("TEXT", texts)], parameters={"top_k": 2}, request_id="r1")
    labels, scores = result.as_numpy("LABEL"), result.as_numpy("SCORE")
    assert labels.shape == (3, 2) and scores.dtype == np.float32
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("r1", "sentiment", "1")
    typed = pipeline("text-classification", model="sentiment", target=target)(texts, top_k=2)
    for row, expected in enumerate(typed):
        assert [label.decode() for label in labels[row]] == [e["label"] for e in expected]
        np.testing.assert_allclose(scores[row], [e["score"] for e in expected], atol=TOLERANCE)


def test_sentence_pairs_and_function_to_apply(client):
    result = client.infer("sentiment", [text_input("TEXT", ["a", "b"]), text_input("TEXT_PAIR", ["c", "d"])],
                          parameters={"top_k": 0, "function_to_apply": "none"})
    scores = result.as_numpy("SCORE")
    assert scores.shape == (2, 2)
    assert not np.allclose(scores.sum(axis=1), 1.0)  # raw logits, not probabilities


def test_embeddings_pooled_by_default_and_token_level_on_request(client, target):
    texts = ["hello world", "a somewhat longer sentence here"]
    pooled = client.infer("minilm", [text_input("TEXT", texts)], parameters={"normalize": True}).as_numpy("EMBEDDING")
    assert pooled.shape == (2, 384) and pooled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    typed = pipeline("feature-extraction", model="minilm", target=target)(texts, pooling="mean", normalize=True)
    np.testing.assert_allclose(pooled, np.array(typed), atol=TOLERANCE)

    outputs = [triton.InferRequestedOutput("TOKEN_EMBEDDINGS"), triton.InferRequestedOutput("TOKEN_COUNT")]
    result = client.infer("minilm", [text_input("TEXT", texts)], outputs=outputs)
    tokens, counts = result.as_numpy("TOKEN_EMBEDDINGS"), result.as_numpy("TOKEN_COUNT")
    assert result.as_numpy("EMBEDDING") is None
    assert tokens.shape == (2, counts.max(), 384) and counts[0] < counts[1]
    assert not tokens[0, counts[0]:].any()  # padding is zeros
    np.testing.assert_allclose(tokens[0, : counts[0]].mean(axis=0), client.infer(
        "minilm", [text_input("TEXT", texts[:1])]).as_numpy("EMBEDDING")[0], atol=1e-4)


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model, inputs, parameters, expected", [
    ("ner", {"TEXT": ["John lives in Paris", "hi"]}, {"aggregation_strategy": "simple", "ignore_labels": "[]"},
     {"ENTITY": ("BYTES", 2), "SCORE": ("FP32", 2), "START": ("INT64", 2), "ENTITY_COUNT": ("INT64", 1)}),
    ("qa", {"QUESTION": ["Where does John live?"], "CONTEXT": ["John lives in Paris."]}, {"top_k": 2},
     {"ANSWER": ("BYTES", 2), "SCORE": ("FP32", 2), "START": ("INT64", 2), "END": ("INT64", 2)}),
    ("fill-mask", {"TEXT": ["Paris is the [MASK] of France."]}, {"top_k": 3},
     {"TOKEN_STR": ("BYTES", 3), "SCORE": ("FP32", 3), "TOKEN": ("INT64", 3), "SEQUENCE": ("BYTES", 3)}),
    ("nli", {"TEXT": ["I like football"]}, {"candidate_labels": "sports, politics, cooking"},
     {"LABEL": ("BYTES", 2), "SCORE": ("FP32", 2)}),
    ("vit", {"IMAGE": [_png()]}, {"top_k": 2}, {"LABEL": ("BYTES", 2), "SCORE": ("FP32", 2)}),
    ("bart-summarizer", {"TEXT": ["A long story about a town and its river."]}, {"max_new_tokens": 6},
     {"SUMMARY_TEXT": ("BYTES", 2)}),
    ("t5-translator", {"TEXT": ["The house is small."]}, {"max_new_tokens": 6}, {"TRANSLATION_TEXT": ("BYTES", 2)}),
    ("gpt2", {"TEXT": ["Hello", "Once upon a time"]}, {"max_new_tokens": 4, "do_sample": False},
     {"GENERATED_TEXT": ("BYTES", 2), "FINISH_REASON": ("BYTES", 2), "GENERATED_TOKENS": ("INT64", 2),
      "PROMPT_TOKENS": ("INT64", 1)}),
])
def test_every_task_answers_with_typed_tensors(client, model, inputs, parameters, expected):
    tensors = [text_input(name, items) for name, items in inputs.items()]
    response = client.infer(model, tensors, parameters=parameters).get_response(as_json=True)
    described = {o["name"]: (o["datatype"], len(o["shape"])) for o in response["outputs"]}
    for name, (datatype, rank) in expected.items():
        assert described[name] == (datatype, rank), name
    metadata = client.get_model_metadata(model)
    # Streams only; conversations only; with return_tensors only.
    on_request = {"TOKEN_IDS", "CONVERSATION", "GENERATED_TOKEN_IDS", "SUMMARY_TOKEN_IDS", "TRANSLATION_TOKEN_IDS"}
    assert {t.name for t in metadata.outputs} - on_request == set(described)


def test_task_results_decode_to_numpy(client):
    result = client.infer("nli", [text_input("TEXT", ["I like football", "taxes rise"])],
                          parameters={"candidate_labels": '["sports", "politics", "cooking"]'})
    labels = result.as_numpy("LABEL")
    assert labels.shape == (2, 3) and {x.decode() for x in labels[0]} == {"sports", "politics", "cooking"}
    np.testing.assert_allclose(result.as_numpy("SCORE").sum(axis=1), 1.0, atol=1e-5)
    qa = client.infer("qa", [text_input("QUESTION", ["Where?"]), text_input("CONTEXT", ["John lives in Paris."])])
    start, end, answer = qa.as_numpy("START")[0, 0], qa.as_numpy("END")[0, 0], qa.as_numpy("ANSWER")[0, 0]
    assert "John lives in Paris."[start:end] == answer.decode()


# -- asyncio and streaming ------------------------------------------------------------------------------


async def test_aio_client_concurrent_requests(target):
    async with triton_aio.InferenceServerClient(target) as client:
        assert await client.is_model_ready("tiny-classifier")
        texts = [f"request number {i}" for i in range(12)]
        results = await asyncio.gather(*(client.infer("tiny-classifier", [text_input("TEXT", [t])]) for t in texts))
        assert all(r.as_numpy("LABEL").shape == (1, 1) for r in results)
        metadata = await client.get_model_metadata("tiny-classifier", as_json=True)
        assert metadata["outputs"][0]["name"] == "LABEL"


def test_stream_infer_answers_each_request_and_reports_errors_in_band(target):
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(target) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(3):
            client.async_stream_infer("sentiment", [text_input("TEXT", [f"text {i}"])], request_id=f"s{i}")
        client.async_stream_infer("no-such-model", [text_input("TEXT", ["x"])], request_id="bad")
        client.async_stream_infer("sentiment", [text_input("TEXT", ["after the error"])], request_id="s3")
        client.stop_stream()
    received = [answers.get(timeout=30) for _ in range(5)]
    ok = {r.get_response().id: r for r, e in received if e is None}
    errors = [e for _, e in received if e is not None]
    assert sorted(ok) == ["s0", "s1", "s2", "s3"]
    assert all(r.as_numpy("LABEL").shape == (1, 1) for r in ok.values())
    assert len(errors) == 1 and "no-such-model" in errors[0].message()


async def test_aio_stream_infer(target):
    async def requests():
        for i in range(4):
            yield {"model_name": "minilm", "inputs": [text_input("TEXT", [f"sentence {i}"])], "request_id": str(i),
                   "parameters": {"pooling": "cls"}}

    async with triton_aio.InferenceServerClient(target) as client:
        received = [(r, e) async for r, e in client.stream_infer(requests())]
    assert [e for _, e in received] == [None] * 4
    assert sorted(r.get_response().id for r, _ in received) == ["0", "1", "2", "3"]
    assert all(r.as_numpy("EMBEDDING").shape == (1, 384) for r, _ in received)


def test_stream_empty_final_response_flag(target):
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(target) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer("sentiment", [text_input("TEXT", ["x"])], request_id="f", enable_empty_final_response=True)
        client.stop_stream()
    result, error = answers.get(timeout=30)
    assert error is None
    assert result.get_response().parameters["triton_final_response"].bool_param is True


# -- token streaming (decoupled generation models) --------------------------------------------------------


GREEDY = {"max_new_tokens": 8, "do_sample": False}


def whole_text(client, prompt: str) -> str:
    result = client.infer("gpt2", [text_input("TEXT", [prompt])], parameters={**GREEDY, "return_full_text": False})
    return result.as_numpy("GENERATED_TEXT")[0, 0].decode()


def test_generation_model_is_decoupled(client):
    config = client.get_model_config("gpt2").config
    assert config.model_transaction_policy.decoupled
    assert "TOKEN_IDS" in {o.name for o in client.get_model_metadata("gpt2").outputs}


def test_stream_infer_streams_tokens_as_they_are_generated(client, target):
    answers: queue.Queue = queue.Queue()
    with triton.InferenceServerClient(target) as streaming:
        streaming.start_stream(callback=lambda result, error: answers.put((result, error)))
        streaming.async_stream_infer("gpt2", [text_input("TEXT", ["Hello there"])], request_id="g",
                                     parameters=GREEDY, enable_empty_final_response=True)
        streaming.stop_stream()
    responses = []
    while not answers.empty():
        result, error = answers.get()
        assert error is None, error
        responses.append(result)
    final = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert final == [False] * (len(responses) - 1) + [True] and len(responses) >= 3  # several token responses
    tokens = responses[:-1]
    assert responses[-1].get_response().outputs == []  # the empty final response
    assert [r.as_numpy("FINISH_REASON")[0, 0] for r in tokens] == [b""] * (len(tokens) - 1) + [b"length"]
    assert sum(r.as_numpy("TOKEN_IDS").shape[1] for r in tokens) == 8
    assert tokens[-1].as_numpy("GENERATED_TOKENS")[0, 0] == 8
    streamed = "".join(r.as_numpy("GENERATED_TEXT")[0, 0].decode() for r in tokens)
    assert streamed == whole_text(client, "Hello there")


async def test_aio_stream_interleaves_several_generations(client, target):
    prompts = {"a": "Once upon a time", "b": "The weather today"}

    async def requests():
        for request_id, prompt in prompts.items():
            yield {"model_name": "gpt2", "inputs": [text_input("TEXT", [prompt])], "request_id": request_id,
                   "parameters": GREEDY}
        yield {"model_name": "gpt2", "inputs": [text_input("TEXT", ["two", "prompts"])], "request_id": "bad"}

    texts = {request_id: "" for request_id in prompts}
    errors = []
    async with triton_aio.InferenceServerClient(target) as aio:
        async for result, error in aio.stream_infer(requests()):
            if error is not None:
                errors.append(error.message())
                continue
            texts[result.get_response().id] += result.as_numpy("GENERATED_TEXT")[0, 0].decode()
    assert len(errors) == 1 and "a streamed request takes one" in errors[0]
    for request_id, prompt in prompts.items():
        assert texts[request_id] == await asyncio.to_thread(whole_text, client, prompt)


# -- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, tensors, parameters, outputs, code, message", [
    ("no-such-model", [("TEXT", ["x"], "BYTES")], {}, [], "NOT_FOUND", "no-such-model"),
    ("sentiment", [("TXT", ["x"], "BYTES")], {}, [], "INVALID_ARGUMENT", "input TXT: is not an input of this model"),
    ("sentiment", [("TEXT", [1.0], "FP32")], {}, [], "INVALID_ARGUMENT", "input TEXT: datatype FP32 does not match BYTES"),
    ("sentiment", [("TEXT", [["a"], ["b"]], "BYTES")], {}, [], "INVALID_ARGUMENT",
     "input TEXT: shape [2, 1] does not match [-1]"),
    ("sentiment", [("TEXT", ["a", "b"], "BYTES"), ("TEXT_PAIR", ["c"], "BYTES")], {}, [], "INVALID_ARGUMENT", "has 1 rows"),
    ("sentiment", [], {}, [], "INVALID_ARGUMENT", "input TEXT: is required"),
    ("sentiment", [("TEXT", ["x"], "BYTES")], {"top_k": -1}, [], "INVALID_ARGUMENT", "top_k"),
    ("sentiment", [("TEXT", ["x"], "BYTES")], {"temperature": 0.5}, [], "INVALID_ARGUMENT", "parameters.temperature"),
    ("sentiment", [("TEXT", ["x"], "BYTES")], {}, ["LOGITS"], "INVALID_ARGUMENT", "output LOGITS: is not an output"),
    ("sentiment", [("TEXT", [b"\xff\xfe"], "BYTES")], {}, [], "INVALID_ARGUMENT", "input TEXT[0]: is not UTF-8"),
    ("sentiment", [("TEXT", [], "BYTES")], {}, [], "INVALID_ARGUMENT", "at least one input"),
    ("minilm", [("TEXT", ["x"], "BYTES")], {"pooling": "mean"}, ["TOKEN_COUNT"], "INVALID_ARGUMENT", "pooling none"),
    ("qa", [("QUESTION", ["q"], "BYTES")], {}, [], "INVALID_ARGUMENT", "input CONTEXT: is required"),
    ("vit", [("IMAGE", [b"not an image"], "BYTES")], {}, [], "INVALID_ARGUMENT", "inputs[0]"),
])
def test_bad_requests_are_refused_with_a_message(client, model, tensors, parameters, outputs, code, message):
    inputs = []
    for name, items, datatype in tensors:
        array = np.array(items, dtype=object if datatype == "BYTES" else np.float32)
        if array.size == 0:
            array = array.reshape(0)
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    error = error_of(lambda: client.infer(model, inputs, parameters=parameters or None,
                                          outputs=[triton.InferRequestedOutput(o) for o in outputs] or None))
    assert error.status() == f"StatusCode.{code}"
    assert message in error.message()


def test_unknown_version_and_unsupported_rpcs(client):
    error = error_of(lambda: client.infer("sentiment", [text_input("TEXT", ["x"])], model_version="9"))
    assert error.status() == "StatusCode.NOT_FOUND" and "no version 9" in error.message()
    error = error_of(lambda: client.infer("sentiment", [text_input("TEXT", ["x"])], model_version="latest"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "model_version" in error.message()
    error = error_of(lambda: client.get_system_shared_memory_status())
    assert error.status() == "StatusCode.UNIMPLEMENTED" and "shared memory" in error.message()
    error = error_of(lambda: client.get_trace_settings())
    assert error.status() == "StatusCode.UNIMPLEMENTED"


# -- statistics and the repository index ---------------------------------------------------------------------


def test_statistics_count_requests_inferences_and_batches(client):
    def stats():
        return client.get_inference_statistics("tiny-classifier").model_stats[0]

    before = stats()
    client.infer("tiny-classifier", [text_input("TEXT", ["one", "two", "three"])])
    error_of(lambda: client.infer("tiny-classifier", [text_input("TEXT", ["x"])], parameters={"top_k": -1}))
    after = stats()
    assert (after.name, after.version) == ("tiny-classifier", "1")
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.inference_stats.queue.count == before.inference_stats.queue.count + 3
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count


def test_repository_index_lists_models_and_states(client, target):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["sentiment"].state == "READY" and index["sentiment"].version == "1"
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True), timeout=10).models
    assert {"sentiment", "minilm", "tiny-classifier"} <= {m.name for m in ready}
    assert {m.state for m in ready} == {"READY"}
    assert len(ready) <= len(index)


# -- custom tasks, served with no extra code ---------------------------------------------------------------------


class ReviewSentimentTask(TextClassificationTask):
    """A custom task registered under its own name: a text classifier, so it gets LABEL and SCORE."""

    name = "review-sentiment"
    aliases = ()


class TokenStatsTask(TokenizingTask):
    """A custom task of no known kind: it gets the generic codec (TEXT or JSON in, JSON out)."""

    name = "token-stats"
    model_class = "AutoModelForSequenceClassification"

    def sanitize(self, params):
        return TaskParams(post=bool(params.get("shout", False)))

    def preprocess(self, inputs, pre):
        return self.tokenize(inputs)

    def postprocess(self, inputs, features, outputs, posts):
        counts = features["attention_mask"].sum(dim=1).tolist()
        return [{"text": text.upper() if shout else text, "tokens": int(n), "logits": outputs["logits"][i]}
                for i, (text, n, shout) in enumerate(zip(inputs, counts, posts))]


@pytest.fixture(scope="module")
def custom_task_target(model_repository, tmp_path_factory):
    """A server whose repository uses two tasks that an installed plugin registers by entry point."""
    plugin = tmp_path_factory.mktemp("plugin")
    info = plugin / "pipeserve_kserve_test_plugin-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pipeserve-kserve-test-plugin\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text(
        "[pipeserve.tasks]\n"
        f"review-sentiment = {__name__}:ReviewSentimentTask\n"
        f"token-stats = {__name__}:TokenStatsTask\n")
    sys.path.insert(0, str(plugin))
    importlib.invalidate_caches()
    task_registry.refresh()
    repo = tmp_path_factory.mktemp("custom-repo")
    add_model(repo, "reviews", task="review-sentiment")
    add_model(repo, "stats", task="token-stats")
    server = ServerThread(server_settings(repo)).start()
    try:
        yield server.target
    finally:
        server.stop()
        sys.path.remove(str(plugin))
        importlib.invalidate_caches()
        task_registry.refresh()


def test_custom_task_subclass_is_served_with_its_parents_tensors(custom_task_target):
    with triton.InferenceServerClient(custom_task_target) as client:
        assert client.get_model_metadata("reviews").platform == "pipeserve:review-sentiment"
        result = client.infer("reviews", [text_input("TEXT", ["great", "bad"])], parameters={"top_k": 2})
        assert result.as_numpy("LABEL").shape == (2, 2) and result.as_numpy("SCORE").dtype == np.float32


def test_custom_task_without_a_codec_gets_json_out(custom_task_target):
    with triton.InferenceServerClient(custom_task_target) as client:
        metadata = client.get_model_metadata("stats")
        assert [t.name for t in metadata.inputs] == ["TEXT", "JSON"] and [t.name for t in metadata.outputs] == ["JSON"]
        result = client.infer("stats", [text_input("TEXT", ["hello there", "hi"])], parameters={"shout": True})
        docs = [json.loads(x) for x in result.as_numpy("JSON")]
        assert [d["text"] for d in docs] == ["HELLO THERE", "HI"]
        assert docs[0]["tokens"] > docs[1]["tokens"] and len(docs[0]["logits"]) == 2
        from_json = client.infer("stats", [text_input("JSON", [json.dumps("from json")])]).as_numpy("JSON")
        assert json.loads(from_json[0])["text"] == "from json"
        error = error_of(lambda: client.infer("stats", [text_input("JSON", ["{not json"])]))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "input JSON[0]: is not JSON" in error.message()


def test_readme_example_runs(target):
    """The README's tritonclient example, as written there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("<!-- kserve-example -->")
    begin = readme.index("```python", start) + len("```python")
    code = readme[begin: readme.index("```", begin)]
    namespace: dict = {}
    exec(code.replace('"localhost:8001"', repr(target)), namespace)  # noqa: S102 - our own README
    assert namespace["labels"].shape == (2, 1)
