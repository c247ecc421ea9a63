"""The HTTP listener: the gRPC port's TLS/mTLS, bearer token and size limit, the drain on shutdown,
and uvicorn inside `pipeserve serve` leaving SIGTERM to the server."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import sys
import threading
import time

import gevent.ssl
import httpx
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests import gated_backend
from tests.conftest import server_settings
from tests.generation_helpers import wait_until
from tests.model_folders import add_model
from tests.server_harness import ServerProcess, ServerThread
from tests.test_security import TOKEN, pki  # noqa: F401  (pki: certificates made for the test)

LIMIT = 64 * 1024
TENSOR = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["I love this"]}


@pytest.fixture(scope="module")
def secured(model_repository, pki):  # noqa: F811
    settings = server_settings(model_repository, load_models=["sentiment", "tiny-classifier"],
                               tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"],
                               auth_token=TOKEN, max_receive_message_bytes=LIMIT)
    running = ServerThread(settings).start()
    yield running
    running.stop()


@pytest.fixture
def https(secured, pki):  # noqa: F811
    """A client with the CA, a client certificate and the token."""
    with httpx.Client(base_url=secured.http_url, verify=_context(pki), timeout=30,
                      headers={"authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def _context(pki, cert: bool = True):  # noqa: F811
    import ssl

    context = ssl.create_default_context(cafile=pki["ca"])
    if cert:
        context.load_cert_chain(pki["client_cert"], pki["client_key"])
    return context


# -- TLS, mTLS, the token ----------------------------------------------------------------------------


def test_https_with_a_client_certificate_and_the_token_is_answered(https, secured):
    assert secured.http_url.startswith("https://")
    answer = https.post("/v2/models/sentiment/infer", json={"inputs": [TENSOR]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["name"] == "LABEL"


def test_tritonclient_http_speaks_mtls_with_the_token(secured, pki):  # noqa: F811
    client = triton_http.InferenceServerClient(
        f"localhost:{secured.server.http_port}", ssl=True, ssl_context_factory=gevent.ssl.create_default_context,
        ssl_options={"ca_certs": pki["ca"], "certfile": pki["client_cert"], "keyfile": pki["client_key"]})
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert client.is_server_ready() and client.get_model_metadata("sentiment", headers=headers)["name"]
        with pytest.raises(InferenceServerException) as refused:
            client.get_model_metadata("sentiment")
        assert refused.value.status() == "401"
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused(secured, pki):  # noqa: F811
    with pytest.raises(httpx.HTTPError), httpx.Client(verify=_context(pki, cert=False), timeout=10) as client:
        client.get(f"{secured.http_url}/v2/health/live")


def test_without_the_token_401_in_the_shape_of_each_api(secured, pki):  # noqa: F811
    with httpx.Client(base_url=secured.http_url, verify=_context(pki), timeout=10) as client:
        # Health stays open, as grpc.health.v1 does on gRPC: probes carry no token.
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        v2 = client.post("/v2/models/sentiment/infer", json={"inputs": [TENSOR]})
        assert v2.status_code == 401 and "bearer token" in v2.json()["error"]
        assert v2.headers["www-authenticate"].startswith("Bearer")
        wrong = client.get("/v2", headers={"authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        pipelines = client.post("/v1/pipelines/sentiment-analysis", json={"inputs": "x"})
        assert pipelines.status_code == 401 and isinstance(pipelines.json()["error"], str)
        openai = client.get("/v1/models")
        assert openai.status_code == 401 and openai.json()["error"]["type"] == "authentication_error"


# -- the size limit ----------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_by_its_length(https, secured):
    big = {"inputs": [{**TENSOR, "data": ["x" * LIMIT]}]}
    answer = https.post("/v2/models/sentiment/infer", json=big)
    assert answer.status_code == 413 and f"at most {LIMIT} bytes" in answer.json()["error"]
    openai = https.post("/v1/chat/completions", content=b"x" * (LIMIT + 1), headers={"content-type": "application/json"})
    assert openai.status_code == 413 and "at most" in openai.json()["error"]["message"]
    assert secured.call(lambda: secured.server.registry.get("sentiment").stats.queued) == 0


def test_a_chunked_body_over_the_limit_is_413_while_it_streams_in(https):
    def chunks():
        yield b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["'
        for _ in range(LIMIT // 1024 + 1):
            yield b"x" * 1024
        yield b'"]}]}'

    answer = https.post("/v2/models/sentiment/infer", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413, answer.text


def test_a_compressed_body_that_inflates_past_the_limit_is_413(https):
    bomb = gzip.compress(json.dumps({"inputs": [{**TENSOR, "data": ["x" * (4 * LIMIT)]}]}).encode())
    assert len(bomb) < LIMIT
    answer = https.post("/v2/models/sentiment/infer", content=bomb, headers={"content-encoding": "gzip"})
    assert answer.status_code == 413 and "inflates" in answer.json()["error"]


# -- the model repository over HTTP (on this server's own models) ---------------------------------------


def test_unload_and_load_through_tritonclient_http(secured, pki):  # noqa: F811
    client = triton_http.InferenceServerClient(
        f"localhost:{secured.server.http_port}", ssl=True, ssl_context_factory=gevent.ssl.create_default_context,
        ssl_options={"ca_certs": pki["ca"], "certfile": pki["client_cert"], "keyfile": pki["client_key"]})
    headers = {"authorization": f"Bearer {TOKEN}"}
    try:
        client.unload_model("tiny-classifier", headers=headers)
        assert not client.is_model_ready("tiny-classifier", headers=headers)
        index = {m["name"]: m for m in client.get_model_repository_index(headers=headers)}
        assert index["tiny-classifier"]["state"] == "UNAVAILABLE"
        client.unload_model("tiny-classifier", headers=headers)  # as Triton: not loaded is unloaded already
        client.load_model("tiny-classifier", headers=headers)
        assert client.is_model_ready("tiny-classifier", headers=headers)
    finally:
        client.close()


# -- the drain ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    plugins = gated_backend.install_plugin(tmp_path_factory.mktemp("plugins"))
    sys.path.insert(0, str(plugins))
    repo = tmp_path_factory.mktemp("drain-repo")
    folder = add_model(repo, "gated-http")
    (folder / "config.pbtxt").write_text('name: "gated-http"\ntask: "text-classification"\nbackend: "gated"\n'
                                         'max_batch_size: 4\ndynamic_batching { }\n')
    running = ServerThread(server_settings(repo)).start()
    yield running
    running.stop()
    sys.path.remove(str(plugins))


def test_a_client_that_leaves_withdraws_its_queued_inputs(gated):
    url = f"{gated.http_url}/v2/models/gated-http/infer"
    gate = gated_backend.gate("gated-http")
    stats = gated.call(lambda: gated.server.registry.get("gated-http").stats)
    failures, batches = stats.failure, len(gate.shapes)
    gate.close()
    holder = threading.Thread(target=lambda: httpx.post(url, json={"inputs": [TENSOR]}, timeout=60))
    holder.start()
    try:
        gate.wait_for_batches(batches + 1)  # the instance is busy: what comes next waits in the queue
        with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as client, pytest.raises(httpx.ReadTimeout):
            client.post(url, json={"inputs": [{**TENSOR, "data": ["a queued input"]}]})
        wait_until(lambda: stats.queued == 0 and stats.failure == failures + 1,
                   what="the queued input withdrawn as its client left")
    finally:
        gate.open()
        holder.join(60)
    assert len(gate.shapes) == batches + 1  # the withdrawn input never ran


def test_draining_refuses_new_calls_with_503_and_lets_calls_in_flight_finish(gated):
    url = gated.http_url
    gate = gated_backend.gate("gated-http")
    batches = len(gate.shapes)
    gate.close()
    answers: dict[str, httpx.Response] = {}
    in_flight = threading.Thread(target=lambda: answers.setdefault("held", httpx.post(
        f"{url}/v2/models/gated-http/infer", json={"inputs": [TENSOR]}, timeout=60)))
    in_flight.start()
    try:
        gate.wait_for_batches(batches + 1)
        stopping = asyncio.run_coroutine_threadsafe(gated.server.stop(grace=30), gated.loop)
        wait_until(lambda: httpx.get(f"{url}/v2/health/ready").status_code == 503, what="readiness turning false")
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        refused = httpx.post(f"{url}/v2/models/gated-http/infer", json={"inputs": [TENSOR]})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert httpx.post(f"{url}/v1/pipelines/text-classification", json={"inputs": "x"}).status_code == 503
    finally:
        gate.open()
        in_flight.join(60)
    assert answers["held"].status_code == 200 and answers["held"].json()["outputs"][0]["shape"] == [1, 1]
    stopping.result(60)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/v2/health/live")


# -- the real process -------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_listens_on_http_and_sigterm_still_drains_and_exits_zero(tmp_path):
    # No models: what is under test is the process's signals with uvicorn in its loop.
    server = ServerProcess(tmp_path, http=True).start()
    try:
        assert httpx.get(f"{server.http_url}/v2/health/ready").status_code == 200
        assert f"listening on 127.0.0.1:{server.port}, http://127.0.0.1:{server.http_port}" in server.log()
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert time.monotonic() - started < 20
    finally:
        server.stop()
    log = server.log()
    assert "draining" in log and "stopped" in log
