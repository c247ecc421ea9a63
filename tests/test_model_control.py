"""Model control at run time: load, unload and reload without a restart (KServe v2 repository RPCs
and pipeserve.v1.ModelService), versions picked by version_policy, poll mode, and mode none.

Each server here serves a temporary repository built from the default one's small models.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from pipeserve.v1 import model_service_pb2 as ms
from pipeserve.v1 import model_service_pb2_grpc as ms_grpc
from tests.conftest import REPOSITORY, server_settings
from tests.model_folders import add_model, link_files, remove_model, write_config
from tests.server_harness import ServerThread

CLASSIFIER = "tiny-classifier"


def text(items: list[str]) -> list[triton.InferInput]:
    tensor = triton.InferInput("TEXT", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object))
    return [tensor]


def labels_of(client: triton.InferenceServerClient, model: str, version: str = "") -> list[str]:
    result = client.infer(model, text(["hello"]), model_version=version, parameters={"top_k": 0})
    return sorted(x.decode() for x in result.as_numpy("LABEL")[0])


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    """Waits for server state that has no event to await (statistics, a background poll)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout}s")
        time.sleep(0.02)


# -- explicit mode ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit(model_repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("explicit-repo")
    add_model(repo, "clf")
    # A long queue delay keeps requests queued long enough to unload the model under them.
    add_model(repo, "slow", extra="max_batch_size: 64\ndynamic_batching { max_queue_delay_microseconds: 5000000 }")
    add_model(repo, "versioned", versions=(1, 2, 3), extra="version_policy { latest { num_versions: 2 } }")
    server = ServerThread(server_settings(repo)).start()
    with triton.InferenceServerClient(server.target) as client:
        yield server, repo, client
    server.stop()


def test_unload_and_load_again_without_restart(explicit):
    server, repo, client = explicit
    assert client.is_model_ready("clf")
    client.unload_model("clf")
    assert not client.is_model_ready("clf")
    # Held by the repository but not loaded: not NOT_FOUND (that is for what the repository does
    # not hold), and not retryable either: someone must load it.
    error = error_of(lambda: client.infer("clf", text(["x"])))
    assert error.status() == "StatusCode.FAILED_PRECONDITION" and "not loaded; load it" in error.message()
    index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert index[("clf", "1")] == "UNAVAILABLE"
    client.unload_model("clf")  # unloading an unloaded repository model is done already, as in Triton
    client.load_model("clf")
    assert client.is_model_ready("clf") and labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]


def test_load_again_picks_up_a_changed_config(explicit):
    server, repo, client = explicit
    write_config(repo / "clf", "clf", extra='parameters { labels: ["bad", "good"] }')
    client.load_model("clf")
    assert labels_of(client, "clf") == ["bad", "good"]
    write_config(repo / "clf", "clf")
    client.load_model("clf")
    assert labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]


def test_failed_load_leaves_the_previous_version_serving(explicit):
    server, repo, client = explicit
    write_config(repo / "clf", "clf", extra="max_batch_size: -3")
    error = error_of(lambda: client.load_model("clf"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "max_batch_size" in error.message()
    assert labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]

    # Weights that cannot be read fail deeper, in the backend: the old instance still answers.
    write_config(repo / "clf", "clf", extra='parameters { labels: ["bad", "good"] }')
    weights = repo / "clf" / "model.safetensors"
    target = weights.resolve()
    weights.unlink()
    weights.write_bytes(b"not safetensors")
    try:
        error = error_of(lambda: client.load_model("clf"))
        assert error.status() == "StatusCode.FAILED_PRECONDITION" and "previous version keeps serving" in error.message()
        assert client.is_model_ready("clf") and labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]
    finally:
        weights.unlink()
        weights.symlink_to(target)
        write_config(repo / "clf", "clf")
    client.load_model("clf")
    assert labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]


def test_unload_lets_in_flight_requests_finish(explicit):
    server, repo, client = explicit
    served = server.server.registry.served["slow"][1]

    async def scenario():
        async with triton_aio.InferenceServerClient(server.target) as aio:
            calls = [asyncio.ensure_future(aio.infer("slow", text([f"in flight {i}"]))) for i in range(4)]
            # Wait until all four sit in the queue (held there by the 5 s queue delay).
            deadline = time.monotonic() + 30
            while server.call(lambda: served.stats.queued) < 4:
                assert time.monotonic() < deadline, "requests never queued"
                await asyncio.sleep(0.02)
            started = time.monotonic()
            await aio.unload_model("slow")
            unload_seconds = time.monotonic() - started
            results = await asyncio.gather(*calls)
            assert not await aio.is_model_ready("slow")
            return results, unload_seconds

    results, unload_seconds = asyncio.run(scenario())
    assert [r.as_numpy("LABEL").shape for r in results] == [(1, 1)] * 4
    assert unload_seconds < 4  # the unload ran the queue at once instead of waiting out the delay
    assert error_of(lambda: client.infer("slow", text(["late"]))).status() == "StatusCode.FAILED_PRECONDITION"
    client.load_model("slow")
    assert client.is_model_ready("slow")


def test_versions_follow_the_version_policy(explicit):
    server, repo, client = explicit
    assert client.get_model_metadata("versioned").versions == ["2", "3"]
    assert client.infer("versioned", text(["x"])).get_response().model_version == "3"
    assert client.infer("versioned", text(["x"]), model_version="2").get_response().model_version == "2"
    assert error_of(lambda: client.infer("versioned", text(["x"]), model_version="1")).status() == "StatusCode.NOT_FOUND"
    assert not client.is_model_ready("versioned", "1")

    write_config(repo / "versioned", "versioned", extra="version_policy { specific { versions: [1, 3] } }")
    client.load_model("versioned")
    assert client.get_model_metadata("versioned").versions == ["1", "3"]
    assert client.get_model_config("versioned").config.version_policy.specific.versions == [1, 3]
    assert {(m.version, m.state) for m in client.get_model_repository_index().models if m.name == "versioned"} >= {
        ("1", "READY"), ("2", "UNAVAILABLE"), ("3", "READY")}

    write_config(repo / "versioned", "versioned", extra="version_policy { all {} }")
    client.load_model("versioned")
    assert client.get_model_metadata("versioned").versions == ["1", "2", "3"]
    stats = client.get_inference_statistics("versioned", "1").model_stats
    assert [(s.name, s.version) for s in stats] == [("versioned", "1")]

    write_config(repo / "versioned", "versioned", extra="version_policy { specific { versions: [4] } }")
    error = error_of(lambda: client.load_model("versioned"))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "versions [4] have no folder" in error.message()
    assert client.get_model_metadata("versioned").versions == ["1", "2", "3"]


def test_model_service_loads_and_unloads(explicit):
    server, repo, client = explicit
    with grpc.insecure_channel(server.target) as channel:
        stub = ms_grpc.ModelServiceStub(channel)
        stub.UnloadModel(ms.UnloadModelRequest(name="clf"), timeout=30)
        states = {(m.name, m.version): m.state for m in stub.ListModels(ms.ListModelsRequest(), timeout=10).models}
        assert states[("clf", 1)] == ms.MODEL_STATE_UNAVAILABLE
        loaded = stub.LoadModel(ms.LoadModelRequest(name="clf"), timeout=60)
        assert [(v.version, v.state) for v in loaded.versions] == [(1, ms.MODEL_STATE_READY)]
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadModel(ms.LoadModelRequest(name="no-such-model"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.is_model_ready("clf")


# -- mode none ------------------------------------------------------------------------------------------


def test_mode_none_refuses_load_and_unload(model_repository, tmp_path):
    add_model(tmp_path, "clf")
    server = ServerThread(server_settings(tmp_path, model_control_mode="none")).start()
    try:
        with triton.InferenceServerClient(server.target) as client:
            for call in (lambda: client.load_model("clf"), lambda: client.unload_model("clf")):
                error = error_of(call)
                assert error.status() == "StatusCode.FAILED_PRECONDITION" and "--model-control-mode none" in error.message()
            with grpc.insecure_channel(server.target) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    ms_grpc.ModelServiceStub(channel).UnloadModel(ms.UnloadModelRequest(name="clf"), timeout=10)
                assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert labels_of(client, "clf") == ["NEGATIVE", "POSITIVE"]
    finally:
        server.stop()


# -- poll mode ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def polling(model_repository, tmp_path_factory):
    repo = tmp_path_factory.mktemp("poll-repo")
    add_model(repo, "first")
    server = ServerThread(server_settings(repo, model_control_mode="poll", repository_poll_seconds=0.3)).start()
    with triton.InferenceServerClient(server.target) as client:
        yield server, repo, client
    server.stop()


def poll(server: ServerThread):
    """One poll now (the background poller may also get there first; either way the state converges)."""
    return server.run(server.server.poller.poll_once())


def test_poll_loads_new_reloads_changed_and_unloads_removed_models(polling):
    server, repo, client = polling
    add_model(repo, "second")
    poll(server)
    assert client.is_model_ready("second")

    write_config(repo / "second", "second", extra='parameters { labels: ["bad", "good"] }')
    poll(server)
    assert labels_of(client, "second") == ["bad", "good"]

    write_config(repo / "second", "second", extra="max_batch_size: -1")
    poll(server)
    assert labels_of(client, "second") == ["bad", "good"]  # the broken change left the last good one serving
    statuses = server.call(lambda: dict(server.server.registry.status))
    assert statuses[("second", 0)].state == "FAILED" and "keeps serving" in statuses[("second", 0)].reason

    remove_model(repo, "second")
    poll(server)
    assert not client.is_model_ready("second")
    assert client.is_model_ready("first")


def test_poll_adds_a_new_version_and_keeps_unchanged_ones(polling):
    server, repo, client = polling
    folder = add_model(repo, "grows", versions=(1,), extra="version_policy { all {} }")
    poll(server)
    first = server.call(lambda: server.server.registry.served["grows"][1])
    assert client.get_model_metadata("grows").versions == ["1"]

    link_files(REPOSITORY / CLASSIFIER, folder / "2")
    poll(server)
    assert client.get_model_metadata("grows").versions == ["1", "2"]
    # Version 1 did not change: the same loaded instance keeps serving (no reload, no blip).
    assert server.call(lambda: server.server.registry.served["grows"][1]) is first


def test_poll_runs_in_the_background(polling):
    server, repo, client = polling
    add_model(repo, "background")
    wait_until(lambda: client.is_model_ready("background"), what="the background poll loading the new model")
    remove_model(repo, "background")
    wait_until(lambda: not client.is_model_ready("background"), what="the background poll unloading it")


def test_model_control_mode_is_checked(tmp_path):
    from pipeserve.server.app import PipeserveServer

    with pytest.raises(ValueError, match="model_control_mode"):
        PipeserveServer(server_settings(Path(tmp_path), model_control_mode="sometimes"))
