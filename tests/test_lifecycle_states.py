"""Every transient state answers a retryable status, and the SDKs ride through it.

The state table (README, Errors): a model the repository holds that is loading (at start-up, or
a load or reload in progress) gets UNAVAILABLE, a retry will do; one that failed to load, or is
held but not loaded, FAILED_PRECONDITION; only a name the repository does not hold NOT_FOUND; an
invalid name INVALID_ARGUMENT. The matrix below drives each state on the real server, for unary
calls and streams, over the typed services and KServe v2, with the Python SDK (sync, asyncio)
and the Node client; afterwards nothing is left queued or running.

(An instance dying under load and the drain on SIGTERM are covered in tests/test_faults.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import httpx
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from pipeserve.client import aio as client_aio
from pipeserve.client import pipeline
from pipeserve.v1 import model_service_pb2 as ms
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from pipeserve.v1 import text_classification_pb2 as tc
from pipeserve.v1 import text_classification_pb2_grpc as tc_grpc
from pipeserve.v1 import text_generation_pb2 as tg
from pipeserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests import gated_backend
from tests.conftest import REPOSITORY, server_settings
from tests.server_harness import ServerThread

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
NODE_CLIENT = Path(__file__).resolve().parent.parent / "clients" / "node"


def write_model(repo: Path, name: str, task: str, source: Path, body: str = "") -> None:
    (repo / name).mkdir()
    (repo / name / "config.pbtxt").write_text(f'task: "{task}"\nsource {{ path: "{source}" }}\n{body}\n')


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, model_repository: Path):
    plugins = gated_backend.install_plugin(tmp_path_factory.mktemp("plugins"))
    sys.path.insert(0, str(plugins))
    repo = tmp_path_factory.mktemp("lifecycle-repo")
    # Loaded first (names load in order): while its load gate is shut, everything is starting up.
    write_model(repo, "a-slow", "text-classification", REPOSITORY / "tiny-classifier",
                'backend: "gated" default_for_task: true dynamic_batching { }')
    write_model(repo, "b-gen", "text-generation", REPOSITORY / "gpt2",
                "default_for_task: true generation { max_new_tokens_limit: 32 }")
    write_model(repo, "c-later", "text-classification", REPOSITORY / "tiny-classifier", 'backend: "gated"')
    yield repo
    sys.path.remove(str(plugins))


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def classify(target: str, model: str = "", timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        stub = tc_grpc.TextClassificationServiceStub(channel)
        return code_of(lambda: stub.Classify(tc.ClassifyRequest(model=model, inputs=["x"]), timeout=timeout))


def stream(target: str, model: str = "", timeout: float = 20) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        stub = tg_grpc.TextGenerationServiceStub(channel)
        request = tg.GenerateStreamRequest(model=model, input="Hello",
                                           parameters=tg.GenerationParameters(max_new_tokens=4, do_sample=False))
        return code_of(lambda: list(stub.GenerateStream(request, timeout=timeout)))


def generate(target: str, model: str = "") -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as channel:
        stub = tg_grpc.TextGenerationServiceStub(channel)
        request = tg.GenerateRequest(model=model, inputs=["Hello"],
                                     parameters=tg.GenerationParameters(max_new_tokens=4, do_sample=False))
        return code_of(lambda: stub.Generate(request, timeout=20))


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def statistics(target: str) -> list[ms.ModelStatistics]:
    with grpc.insecure_channel(target) as channel:
        return list(ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms.GetModelStatisticsRequest()).models)


def assert_idle(target: str) -> None:
    """Nothing queued, in flight or generating on any model, once the calls have ended."""
    deadline = time.monotonic() + 10
    while True:
        busy = [(m.name, m.in_flight, m.queued, m.active_sequences) for m in statistics(target)
                if m.in_flight or m.queued or m.active_sequences]
        if not busy:
            return
        assert time.monotonic() < deadline, f"left running: {busy}"
        time.sleep(0.05)


def node_call(target: str, *, wait_for_ready: bool, timeout: float) -> subprocess.Popen:
    """The Node client classifying once (a process of its own), printing OK or the status name."""
    script = textwrap.dedent(f"""
        import {{ pipeline, statusName }} from './src/index.js';
        const classify = pipeline('text-classification', {{ target: '{target}', model: 'a-slow',
                                  waitForReady: {'true' if wait_for_ready else 'false'}, timeout: {timeout},
                                  retries: 0 }});
        try {{ await classify('x'); console.log('OK'); }}
        catch (e) {{ console.log(statusName(e.code) + ' ' + e.details); }}
        finally {{ classify.close(); }}
    """)
    return subprocess.Popen(["node", "--input-type=module", "-e", script], cwd=NODE_CLIENT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def node_available() -> bool:
    return (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir()


def test_start_up_answers_retryable_statuses_until_ready_and_the_sdks_ride_through(repo):
    gate = gated_backend.load_gate("a-slow")
    gate.clear()
    server = ServerThread(server_settings(repo))
    server._thread.start()  # not .start(): that returns once the models have loaded
    try:
        deadline = time.monotonic() + 60
        while server.server is None or server.server.port is None:
            assert time.monotonic() < deadline and server._error is None, server._error
            time.sleep(0.02)
        target = f"127.0.0.1:{server.server.port}"
        while code_of(lambda: health(target))[0] != grpc.StatusCode.OK:
            assert time.monotonic() < deadline and server._error is None, server._error
            time.sleep(0.02)

        # Probes: live, not ready.
        assert health(target, "liveness") == SERVING
        assert health(target) == health(target, "readiness") == NOT_SERVING

        # Held models and their tasks: UNAVAILABLE, saying what is loading; a retry will do.
        for call in (lambda: classify(target, "a-slow"), lambda: classify(target), lambda: stream(target, "b-gen"),
                     lambda: stream(target), lambda: generate(target, "b-gen"), lambda: generate(target)):
            code, details = call()
            assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details and "retry" in details, details
        # What the repository does not hold, and names that cannot be models: final at once.
        assert classify(target, "no-such-model")[0] == grpc.StatusCode.NOT_FOUND
        code, details = classify(target, "../etc")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid model name" in details

        # KServe v2: the same statuses; not ready.
        with triton.InferenceServerClient(target) as client:
            assert not client.is_server_ready() and not client.is_model_ready("a-slow")
            text = triton.InferInput("TEXT", [1], "BYTES")
            text.set_data_from_numpy(__import__("numpy").array([b"x"], dtype=object))
            with pytest.raises(InferenceServerException) as info:
                client.infer("a-slow", [text])
            assert info.value.status() == "StatusCode.UNAVAILABLE" and "loading" in info.value.message()
            with pytest.raises(InferenceServerException) as info:
                client.infer("no-such-model", [text])
            assert info.value.status() == "StatusCode.NOT_FOUND"

        # HTTP (v2 REST, the pipelines, OpenAI): the same states as 503 / 404 / 400.
        http = f"http://127.0.0.1:{server.server.http_port}"
        infer = {"inputs": [{"name": "TEXT", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}
        assert httpx.get(f"{http}/v2/health/live").status_code == 200
        assert httpx.get(f"{http}/v2/health/ready").status_code == 503
        for url, body in ((f"{http}/v2/models/a-slow/infer", infer),
                          (f"{http}/v1/pipelines/text-classification", {"inputs": "x"}),
                          (f"{http}/v1/completions", {"model": "b-gen", "prompt": "Hi", "max_tokens": 2})):
            reply = httpx.post(url, json=body, timeout=10)
            assert reply.status_code == 503 and "loading" in reply.text, (url, reply.status_code, reply.text)
        assert httpx.post(f"{http}/v2/models/no-such-model/infer", json=infer).status_code == 404

        # The SDKs: without wait_for_ready the call fails fast with the retryable status ...
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            with pipeline("sentiment-analysis", model="a-slow", target=target, retries=0) as remote:
                remote("x")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 5
        node_fast = node_call(target, wait_for_ready=False, timeout=30) if node_available() else None

        # ... with it, calls made now (unary and streams, sync, asyncio and Node) answer once the
        # model is ready, within their deadline.
        def sync_unary():
            with pipeline("sentiment-analysis", model="a-slow", target=target, wait_for_ready=True, retries=0,
                          timeout=60) as remote:
                return remote("I love this")

        def sync_stream():
            with pipeline("text-generation", model="b-gen", target=target, wait_for_ready=True, timeout=60) as remote:
                return "".join(e.text for e in remote.stream("Hello", max_new_tokens=4, do_sample=False))

        async def aio_unary():
            async with client_aio.pipeline("sentiment-analysis", target=target, wait_for_ready=True,
                                           timeout=60) as remote:
                return await remote("I love this")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            waiting = [pool.submit(sync_unary), pool.submit(sync_stream), pool.submit(asyncio.run, aio_unary())]
            node_waiting = node_call(target, wait_for_ready=True, timeout=60) if node_available() else None
            time.sleep(1.5)  # every one of them has met the loading state by now
            assert not any(f.done() for f in waiting), [f.exception() for f in waiting if f.done()]
            gate.set()
            results = [f.result(timeout=90) for f in waiting]
        assert results[0][0]["label"] in ("NEGATIVE", "POSITIVE") and results[2][0]["label"] in ("NEGATIVE", "POSITIVE")
        assert isinstance(results[1], str) and results[1]
        if node_fast is not None:
            out = node_fast.communicate(timeout=60)[0].strip()
            assert out.startswith("UNAVAILABLE") and "loading" in out, out
        if node_waiting is not None:
            out, err = node_waiting.communicate(timeout=90)
            assert out.strip() == "OK", (out, err)

        deadline = time.monotonic() + 60
        while health(target) != SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert classify(target, "a-slow")[0] == grpc.StatusCode.OK and stream(target)[0] == grpc.StatusCode.OK
        assert httpx.post(f"{http}/v2/models/a-slow/infer", json=infer, timeout=10).status_code == 200
        assert_idle(target)
    finally:
        gate.set()
        if server._started.wait(120):
            server.stop()


@pytest.fixture(scope="module")
def running(repo):
    # c-later stays unloaded until a test loads it.
    server = ServerThread(server_settings(repo, load_models=["a-slow", "b-gen"])).start()
    yield server
    server.stop()


def hammer(target: str, calls, seconds: float) -> list[tuple[grpc.StatusCode, str]]:
    """Runs `calls` (functions returning (code, details)) round-robin from 4 threads for `seconds`."""
    outcomes: list[tuple[grpc.StatusCode, str]] = []
    stop = time.monotonic() + seconds

    def worker(i: int) -> None:
        n = i
        while time.monotonic() < stop:
            outcomes.append(calls[n % len(calls)]())
            n += 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    return outcomes


def test_a_load_in_progress_answers_unavailable_then_serves(running):
    target = running.target
    gate = gated_backend.load_gate("c-later")
    # Not loaded yet: held by the repository, so not NOT_FOUND; someone must load it.
    code, details = classify(target, "c-later")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in details, details
    gate.clear()
    with grpc.insecure_channel(target) as channel:
        load = ms_grpc.ModelServiceStub(channel).LoadModel.future(ms.LoadModelRequest(name="c-later"), timeout=60)
        try:
            deadline = time.monotonic() + 10
            while True:  # the load request has begun
                code, details = classify(target, "c-later")
                if code == grpc.StatusCode.UNAVAILABLE:
                    break
                assert code == grpc.StatusCode.FAILED_PRECONDITION and time.monotonic() < deadline, (code, details)
                time.sleep(0.01)
            assert "loading" in details and "retry" in details
            with pipeline("sentiment-analysis", model="c-later", target=target, wait_for_ready=True,
                          timeout=60) as remote:
                answer = concurrent.futures.ThreadPoolExecutor(1).submit(remote, "x")
                time.sleep(0.5)
                assert not answer.done()
                gate.set()
                assert answer.result(60)[0]["label"] in ("NEGATIVE", "POSITIVE")
            load.result(60)
        finally:
            gate.set()
    assert classify(target, "c-later")[0] == grpc.StatusCode.OK
    assert_idle(target)


def test_reload_and_unload_of_a_busy_model_never_answer_not_found(running, repo):
    target = running.target
    calls = [lambda: classify(target, "a-slow"), lambda: classify(target), lambda: stream(target, "b-gen")]
    with grpc.insecure_channel(target) as channel:
        models = ms_grpc.ModelServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(hammer, target, calls, 4.0)
            time.sleep(0.5)
            # Reload with a changed config (a new load, then the old version retires), then a
            # reload of the generation model, then unload and load again: under the calls.
            config = repo / "a-slow" / "config.pbtxt"
            config.write_text(config.read_text() + "\nparameters { labels: [\"bad\", \"good\"] }\n")
            models.LoadModel(ms.LoadModelRequest(name="a-slow"), timeout=60)
            models.LoadModel(ms.LoadModelRequest(name="b-gen"), timeout=60)
            models.UnloadModel(ms.UnloadModelRequest(name="a-slow"), timeout=60)
            unloaded = [classify(target, "a-slow")]
            models.LoadModel(ms.LoadModelRequest(name="a-slow"), timeout=60)
            outcomes = load.result(60)
    codes = {code for code, _ in outcomes}
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.NOT_FOUND not in codes, sorted(map(str, codes))
    # Unary calls for the unloaded model (and the task it served) are the only non-answers a
    # retry cannot fix; nothing else.
    final = [(c, d) for c, d in outcomes if c not in RETRYABLE | {grpc.StatusCode.OK}]
    assert all(c == grpc.StatusCode.FAILED_PRECONDITION and "not loaded" in d for c, d in final), final
    assert unloaded[0][0] == grpc.StatusCode.FAILED_PRECONDITION
    with pipeline("sentiment-analysis", model="a-slow", target=target) as remote:
        assert remote("x")[0]["label"] in ("bad", "good")
    assert_idle(target)


@pytest.mark.slow
def test_a_call_made_during_a_drain_is_answered_by_the_replacement(model_repository):
    """A rolling update on one address (a sidecar's socket, a restarted process): the old server
    drains and exits, a new one starts there; a call made in between, with wait_for_ready, is
    answered by the new one within its deadline."""
    from tests.server_harness import ServerProcess

    old = ServerProcess(model_repository, "--load-models", "tiny-classifier").start()
    port = old.port
    try:
        old.signal()
        with pipeline("sentiment-analysis", model="tiny-classifier", target=old.target, wait_for_ready=True,
                      timeout=120) as remote, concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(remote, "made during the hand-over")
            assert old.wait(60) == 0
            assert not answer.done(), answer.exception() if answer.done() else None
            new = ServerProcess(model_repository, "--load-models", "tiny-classifier", port=port)
            new.proc = subprocess.Popen(new.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=new.env)
            try:
                assert answer.result(120)[0]["label"] in ("NEGATIVE", "POSITIVE")
            finally:
                new.stop()
    finally:
        old.stop()


def test_in_poll_mode_a_model_added_to_the_repository_is_unavailable_until_the_poll_loads_it(tmp_path):
    repo = tmp_path / "polled"
    repo.mkdir()
    write_model(repo, "first", "text-classification", REPOSITORY / "tiny-classifier")
    server = ServerThread(server_settings(repo, model_control_mode="poll", repository_poll_seconds=3)).start()
    try:
        write_model(repo, "added", "text-classification", REPOSITORY / "tiny-classifier")
        code, details = classify(server.target, "added")
        # (Unless the poll that picks it up has just begun: then it is loading, UNAVAILABLE too.)
        assert code == grpc.StatusCode.UNAVAILABLE and ("next repository poll" in details or "loading" in details), (
            code, details)
        with pipeline("sentiment-analysis", model="added", target=server.target, wait_for_ready=True,
                      timeout=60) as remote:
            assert remote("x")[0]["label"] in ("NEGATIVE", "POSITIVE")
        assert_idle(server.target)
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("signal_after", [0.5, 1.3, 2.0])
def test_sigterm_under_a_64_client_load_ends_every_call_ok_or_unavailable(model_repository, signal_after):
    """Clients that resend at once after each answer (unary and streams), SIGTERM mid-load, at a
    different moment in each trial: no call may end CANCELLED (lost to a client that retries only
    UNAVAILABLE), the process exits 0."""
    from tests.server_harness import ServerProcess

    server = ServerProcess(model_repository, "--load-models", "tiny-classifier", "gpt2").start()
    codes: dict[str, int] = {}

    async def load() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            classify_rpc = tc_grpc.TextClassificationServiceStub(channel).Classify
            stream_rpc = tg_grpc.TextGenerationServiceStub(channel).GenerateStream
            request = tg.GenerateStreamRequest(model="gpt2", input="Hello",
                                               parameters=tg.GenerationParameters(max_new_tokens=16, do_sample=False))

            async def client(i: int) -> None:
                while server.proc.poll() is None:
                    try:
                        if i % 4 == 0:
                            async for _ in stream_rpc(request, timeout=30):
                                pass
                        else:
                            await classify_rpc(tc.ClassifyRequest(model="tiny-classifier", inputs=["hi"]), timeout=30)
                        code = "OK"
                    except grpc.aio.AioRpcError as exc:
                        code = exc.code().name
                    codes[code] = codes.get(code, 0) + 1

            clients = [asyncio.ensure_future(client(i)) for i in range(64)]
            await asyncio.sleep(signal_after)
            server.signal()
            await asyncio.wait(clients, timeout=60)

    try:
        asyncio.run(load())
        assert server.wait(30) == 0
    finally:
        server.stop()
    assert codes.get("OK", 0) > 0 and set(codes) <= {"OK", "UNAVAILABLE"}, codes
