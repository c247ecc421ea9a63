"""KServe v2 REST as Triton serves it: tritonclient.http against the real server, every endpoint,
binary tensors on and off, each answer equal to tritonclient.grpc's for the same request; and bad
requests get a 4xx that names what to fix."""

from __future__ import annotations

import gzip
import io
import json

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


# One request per default model: its inputs (name -> values) and parameters.
REQUESTS = {
    "sentiment": ({"TEXT": ["I love this", "this is awful"], "TEXT_PAIR": ["really", "truly"]}, {"top_k": 2}),
    "tiny-classifier": ({"TEXT": ["hello there"]}, {}),
    "minilm": ({"TEXT": ["hello world", "a somewhat longer sentence"]}, {"normalize": True}),
    "ner": ({"TEXT": ["John lives in Paris", "hi"]}, {"aggregation_strategy": "simple"}),
    "qa": ({"QUESTION": ["Where does John live?"], "CONTEXT": ["John lives in Paris."]}, {"top_k": 2}),
    "fill-mask": ({"TEXT": ["Paris is the [MASK] of France."]}, {"top_k": 3}),
    "nli": ({"TEXT": ["I like football"]}, {"candidate_labels": "sports, politics, cooking"}),
    "vit": ({"IMAGE": [_png()]}, {"top_k": 2}),
    "gpt2": ({"TEXT": ["Hello", "Once upon a time"]}, {"max_new_tokens": 4, "do_sample": False}),
    "bart-summarizer": ({"TEXT": ["A long story about a town and its river."]}, {"max_new_tokens": 6}),
    "t5-translator": ({"TEXT": ["The house is small."]}, {"max_new_tokens": 6}),
}


@pytest.fixture(scope="module")
def http_url(server) -> str:
    return server.http_url


@pytest.fixture(scope="module")
def rest(http_url):
    client = triton_http.InferenceServerClient(http_url.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(target):
    with triton_grpc.InferenceServerClient(target) as client:
        yield client


def http_inputs(inputs: dict, binary: bool) -> list[triton_http.InferInput]:
    tensors = []
    for name, items in inputs.items():
        array = np.array(items, dtype=object)
        tensor = triton_http.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    return tensors


def grpc_inputs(inputs: dict) -> list[triton_grpc.InferInput]:
    tensors = []
    for name, items in inputs.items():
        array = np.array(items, dtype=object)
        tensor = triton_grpc.InferInput(name, list(array.shape), "BYTES")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def assert_same_tensors(got: np.ndarray, expected: np.ndarray, name: str) -> None:
    if got.dtype == object:  # tritonclient.http reads JSON BYTES as text, binary BYTES as bytes
        got = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(got)
    assert got.shape == expected.shape and got.dtype == expected.dtype, name
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6, equal_nan=True, err_msg=name)
    else:
        assert (got == expected).all(), name


# -- health, metadata, config, statistics, repository ---------------------------------------------------


def test_health_and_server_metadata(rest, grpc_client, http_url):
    assert rest.is_server_live() and rest.is_server_ready()
    assert rest.is_model_ready("sentiment") and rest.is_model_ready("sentiment", "1")
    assert not rest.is_model_ready("no-such-model") and not rest.is_model_ready("sentiment", "7")
    expected = grpc_client.get_server_metadata(as_json=True)
    assert rest.get_server_metadata() == {"name": expected["name"], "version": expected["version"],
                                          "extensions": expected["extensions"]}
    ready = httpx.get(f"{http_url}/v2/models/no-such-model/ready")
    assert ready.status_code == 503 and ready.json() == {"name": "no-such-model", "ready": False}


@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_model_metadata_and_config_equal_grpc(rest, grpc_client, model):
    metadata = rest.get_model_metadata(model)
    expected = grpc_client.get_model_metadata(model, as_json=True)
    for tensor in (*expected["inputs"], *expected["outputs"]):
        tensor["shape"] = [int(d) for d in tensor["shape"]]  # protobuf's JSON writes int64 as text
    assert metadata == expected
    assert rest.get_model_metadata(model, "1") == metadata
    # Triton's config JSON: protobuf's JSON mapping, every field, 64-bit integers as numbers.
    config = rest.get_model_config(model)
    assert isinstance(config["max_batch_size"], int) and all(isinstance(d, int) for d in config["input"][0]["dims"])
    assert json_format.ParseDict(config, model_config_pb2.ModelConfig()) == grpc_client.get_model_config(model).config


def test_statistics_equal_grpc(rest, grpc_client):
    rest.infer("tiny-classifier", http_inputs({"TEXT": ["counted"]}, binary=True))
    for name in ("", "tiny-classifier"):
        stats = json_format.ParseDict(rest.get_inference_statistics(name), service_pb2.ModelStatisticsResponse())
        assert stats == grpc_client.get_inference_statistics(name)
    one = rest.get_inference_statistics("tiny-classifier", "1")["model_stats"]
    assert [(s["name"], s["version"]) for s in one] == [("tiny-classifier", "1")] and one[0]["inference_count"] >= 1


def test_repository_index_equals_grpc(rest, grpc_client, http_url):
    expected = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert rest.get_model_repository_index() == expected
    ready = httpx.post(f"{http_url}/v2/repository/index", json={"ready": True}).json()
    assert ready == [m for m in expected if m["state"] == "READY"]


# -- inference -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", sorted(REQUESTS))
def test_infer_equals_grpc_with_binary_tensors_on_and_off(rest, grpc_client, model, binary):
    inputs, parameters = REQUESTS[model]
    if not binary and model == "vit":
        pytest.skip("image bytes are not UTF-8: they travel only as binary data, as with Triton")
    expected = grpc_client.infer(model, grpc_inputs(inputs), parameters=parameters, request_id="same")
    names = [o["name"] for o in expected.get_response(as_json=True)["outputs"]]
    # binary: no outputs named, so tritonclient asks for all of them as binary data; json: each by name.
    outputs = None if binary else [triton_http.InferRequestedOutput(n, binary_data=False) for n in names]
    result = rest.infer(model, http_inputs(inputs, binary), outputs=outputs, parameters=parameters, request_id="same")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (model, "1", "same")
    assert [o["name"] for o in response["outputs"]] == names
    assert all(("data" in o) != binary for o in response["outputs"])
    for name in names:
        assert_same_tensors(result.as_numpy(name), expected.as_numpy(name), name)


def test_each_output_comes_binary_or_as_json_as_asked(http_url):
    body = json.dumps({"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["I love this"]}],
                       "outputs": [{"name": "LABEL", "parameters": {"binary_data": False}},
                                   {"name": "SCORE", "parameters": {"binary_data": True}}]}).encode()
    answer = httpx.post(f"{http_url}/v2/models/sentiment/infer", content=body,
                        headers={"content-type": "application/json"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    length = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.content[:length])
    label, score = header["outputs"]
    assert label["data"][0] in ("POSITIVE", "NEGATIVE") and "parameters" not in label
    assert score["parameters"] == {"binary_data_size": 4} and "data" not in score
    assert np.frombuffer(answer.content[length:], dtype="<f4").shape == (1,)


def test_json_tensors_may_be_nested_as_their_shape(http_url):
    flat = {"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["a b", "c d"]}
    nested = {**flat, "shape": [2], "data": [["a b"], ["c d"]]}
    answers = [httpx.post(f"{http_url}/v2/models/tiny-classifier/infer", json={"inputs": [t]}).json()
               for t in (flat, nested)]
    assert answers[0] == answers[1] and answers[0]["outputs"][0]["shape"] == [2, 1]


def test_compressed_requests_are_inflated(rest):
    for algorithm in ("gzip", "deflate"):
        result = rest.infer("sentiment", http_inputs({"TEXT": ["compressed"]}, binary=True),
                            request_compression_algorithm=algorithm)
        assert result.as_numpy("LABEL").shape == (1, 1)


def test_decoupled_models_answer_infer_once(rest):
    result = rest.infer("gpt2", http_inputs({"TEXT": ["Hello"]}, binary=False),
                        parameters={"max_new_tokens": 3, "do_sample": False})
    assert result.as_numpy("GENERATED_TOKENS")[0, 0] == 3


# -- errors: Triton's {"error": ...} with the right status, never a 500 for the client's mistake ------------


def test_tritonclient_reads_errors_with_their_status(rest):
    with pytest.raises(InferenceServerException) as missing:
        rest.infer("no-such-model", http_inputs({"TEXT": ["x"]}, binary=True))
    assert missing.value.status() == "404" and "no-such-model" in missing.value.message()
    with pytest.raises(InferenceServerException) as wrong:
        rest.infer("sentiment", http_inputs({"QUESTION": ["x"]}, binary=True))
    assert wrong.value.status() == "400" and "TEXT" in wrong.value.message()


TENSOR = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["x"]}


@pytest.mark.parametrize("body, headers, status, says", [
    (b'{"inputs": [', {}, 400, "not valid JSON"),
    (b"\xff\xfe", {}, 400, "not UTF-8"),
    (b"[1, 2]", {}, 400, "must be a JSON object"),
    (json.dumps({"inputs": [TENSOR]}).encode(), {"content-type": "text/plain"}, 415, "application/json"),
    (json.dumps({"inputs": [TENSOR], "input": []}).encode(), {}, 400, "input: is not a field"),
    (json.dumps({"inputs": [{**TENSOR, "dims": [1]}]}).encode(), {}, 400, "dims"),
    (json.dumps({"inputs": [{**TENSOR, "shape": [2]}]}).encode(), {}, 400, "needs 2"),
    (json.dumps({"inputs": [{**TENSOR, "shape": [1, 1]}]}).encode(), {}, 400, "does not match [-1]"),
    (json.dumps({"inputs": [{**TENSOR, "datatype": "FP32", "data": [1.0]}]}).encode(), {}, 400, "datatype FP32"),
    (json.dumps({"inputs": [{**TENSOR, "data": [1]}]}).encode(), {}, 400, "must be a string"),
    (json.dumps({"inputs": [{k: v for k, v in TENSOR.items() if k != "data"}]}).encode(), {}, 400,
     "neither data nor"),
    (json.dumps({"inputs": [TENSOR], "parameters": {"top_k": [1]}}).encode(), {}, 400, "parameters.top_k"),
    (json.dumps({"inputs": [TENSOR], "parameters": {"temperature": 1}}).encode(), {}, 400, "allowed: "),
    (json.dumps({"inputs": [TENSOR], "outputs": [{"name": "NOPE"}]}).encode(), {}, 400, "its outputs: LABEL"),
    (json.dumps({"inputs": [{**TENSOR, "parameters": {"binary_data_size": 9}}]}).encode()[:-1] + b"}",
     {}, 400, "data and binary_data_size"),
    (b'{"inputs": []}', {"inference-header-content-length": "900"}, 400, "body holds"),
    (b'{"inputs": []}xx', {"inference-header-content-length": "14"}, 400, "after the inputs' binary data"),
    (b"not gzip", {"content-encoding": "gzip"}, 400, "not valid gzip"),
    (gzip.compress(b"{}"), {"content-encoding": "br"}, 415, "content-encoding"),
])
def test_bad_inference_requests_get_4xx_naming_the_fix(http_url, body, headers, status, says):
    answer = httpx.post(f"{http_url}/v2/models/sentiment/infer", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]


@pytest.mark.parametrize("method, path, status, says", [
    ("GET", "/v2/models/no-such-model", 404, "no-such-model"),
    ("GET", "/v2/models/sentiment/versions/x/config", 400, "model_version"),
    ("GET", "/v2/models/sentiment/versions/7", 404, "7"),
    ("GET", "/v2/nothing/here", 404, "no endpoint"),
    ("DELETE", "/v2/models/sentiment", 405, "does not take DELETE"),
    ("GET", "/v2/systemsharedmemory/status", 501, "shared memory"),
    ("POST", "/v2/cudasharedmemory/region/r/register", 501, "shared memory"),
    ("GET", "/v2/trace/setting", 501, "tracing"),
    ("POST", "/v2/repository/models/no-such-model/load", 404, "no-such-model"),
])
def test_other_bad_requests_get_their_status(http_url, method, path, status, says):
    answer = httpx.request(method, f"{http_url}{path}")
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]


def test_load_refuses_config_overrides(rest):
    with pytest.raises(InferenceServerException) as refused:
        rest.load_model("sentiment", config=json.dumps({"max_batch_size": 2}))
    assert refused.value.status() == "400" and "parameters.config" in refused.value.message()


def test_readme_example_runs(http_url):
    """The README's tritonclient.http example, as written there."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("<!-- kserve-http-example -->")
    begin = readme.index("```python", start) + len("```python")
    code = readme[begin: readme.index("```", begin)]
    namespace: dict = {}
    exec(code.replace('"localhost:8000"', repr(http_url.removeprefix("http://"))), namespace)  # noqa: S102
    assert namespace["labels"].shape == (2, 1)
