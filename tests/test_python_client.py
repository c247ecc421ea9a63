"""The Python SDK's cross-cutting behaviour over the wire: deadlines, retries with backoff on
UNAVAILABLE (within the deadline), wait-for-ready, call metadata, the target from the
environment, and a codec for every task service the server exposes. (TLS, mTLS, the token and
unix sockets: tests/test_security.py.)"""

from __future__ import annotations

import time

import grpc
import pytest

from pipeserve.client import ConnectionOptions, aio, pipeline
from pipeserve.client.tasks import CODECS

# Loopback port 1 (tcpmux): nothing listens there, so a connection is refused at once.
NOBODY = "127.0.0.1:1"


class CountingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Counts the attempts a pipeline makes and keeps the metadata of the last one."""

    def __init__(self) -> None:
        self.attempts = 0
        self.metadata: list[tuple[str, str]] = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.attempts += 1
        self.metadata = list(client_call_details.metadata or [])
        return continuation(client_call_details, request)


def counted(target: str, **kwargs):
    counter = CountingInterceptor()
    options = ConnectionOptions(target=target, **kwargs)
    channel = grpc.intercept_channel(options.sync_channel(), counter)
    return pipeline("sentiment-analysis", channel=channel, target=target, **kwargs), counter, channel


def test_unavailable_is_retried_with_backoff_then_reported():
    clf, counter, channel = counted(NOBODY, retries=3, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        clf("x")
    channel.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert counter.attempts == 4
    # Backoffs of at least 0.025, 0.05 and 0.1 s (jitter takes off at most half).
    assert time.monotonic() - started >= 0.175


def test_other_errors_are_not_retried(target):
    clf, counter, channel = counted(target, retries=3)
    with pytest.raises(grpc.RpcError) as caught:
        clf([])  # no inputs: INVALID_ARGUMENT, final
    channel.close()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert counter.attempts == 1


def test_retries_stop_at_the_calls_deadline():
    clf, counter, channel = counted(NOBODY, retries=1000, backoff=0.05, timeout=0.6)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        clf("x")
    channel.close()
    elapsed = time.monotonic() - started
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert elapsed < 2.5, f"retried for {elapsed:.2f}s past a 0.6s deadline"
    assert 2 <= counter.attempts < 1000


def test_a_deadline_shorter_than_the_call_is_deadline_exceeded(target):
    with pipeline("sentiment-analysis", target=target) as clf:
        with pytest.raises(grpc.RpcError) as caught:
            clf("x", timeout=1e-6)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert clf("x", timeout=30)[0]["label"]  # the pipeline still works after it


def test_wait_for_ready_waits_until_the_deadline_instead_of_failing_at_once():
    with pipeline("sentiment-analysis", target=NOBODY, wait_for_ready=True, timeout=0.5) as clf:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            clf("x")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started >= 0.45


def test_token_and_metadata_travel_on_every_call(target):
    clf, counter, channel = counted(target, token="abc", metadata={"X-Request-Id": "42"})
    clf("x")
    channel.close()
    assert ("authorization", "Bearer abc") in counter.metadata
    assert ("x-request-id", "42") in counter.metadata  # keys lower-cased, as gRPC requires


def test_target_comes_from_the_environment(target, monkeypatch):
    monkeypatch.setenv("PIPESERVE_TARGET", target)
    with pipeline("sentiment-analysis") as clf:
        assert clf.options.target == target
        assert clf("I love this")[0]["label"]


def test_connection_options_are_checked():
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        ConnectionOptions(tls_cert="client.crt")
    with pytest.raises(ValueError, match="timeout"):
        ConnectionOptions(timeout=0)


async def test_asyncio_pipeline_retries_and_honours_deadlines(target):
    clf = aio.pipeline("sentiment-analysis", target=NOBODY, retries=2, backoff=0.05)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        await clf("x")
    await clf.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started >= 0.07
    async with aio.pipeline("sentiment-analysis", target=target) as clf:
        with pytest.raises(grpc.RpcError) as caught:
            await clf("x", timeout=1e-6)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await clf("I love this"))[0]["label"]


def test_every_task_service_the_server_exposes_has_a_codec(target):
    """pipeline(task, target=...) exists for each typed task service the server runs."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=5))
    exposed = {s.name for s in reply.list_services_response.service
               if s.name.startswith("pipeserve.v1.") and s.name != "pipeserve.v1.ModelService"}
    covered = {codec.stub.__name__.removesuffix("Stub") for codec in CODECS}
    missing = {name for name in exposed if name.removeprefix("pipeserve.v1.") not in covered}
    assert exposed and not missing, f"no SDK codec for {sorted(missing)}"


def test_round_robin_over_a_resolved_address_list(target):
    """lb_policy reaches gRPC's channel: round_robin over an ipv4: list (a headless Service's pods)."""
    host, port = target.rsplit(":", 1)
    with pipeline("sentiment-analysis", target=f"ipv4:{host}:{port},{host}:{port}", lb_policy="round_robin") as clf:
        assert [clf("x")[0]["label"] for _ in range(3)]
