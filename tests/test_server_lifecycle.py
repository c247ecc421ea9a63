"""Health, reflection, settings from the environment, and the drain on SIGTERM."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pipeserve.v1 import feature_extraction_pb2 as fe_pb
from pipeserve.v1 import feature_extraction_pb2_grpc as fe_grpc
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc
from tests.server_harness import ServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("service", ["", "liveness", "readiness", "pipeserve.v1.TextClassificationService",
                                     "pipeserve.v1.FeatureExtractionService", "pipeserve.v1.ModelService"])
def test_health_reports_serving_for_the_server_and_each_service(target, service):
    assert health(target, service) == SERVING


def test_health_unknown_service_is_not_found(target):
    with pytest.raises(grpc.RpcError) as info:
        health(target, "no.such.Service")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(target):
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"pipeserve.v1.TextClassificationService", "pipeserve.v1.FeatureExtractionService",
            "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_calls_and_exits_zero(model_repository, tmp_path):
    """Readiness flips first, new calls get UNAVAILABLE, the call in flight completes, exit 0.

    Settings come from the environment here, as a container would set them.
    """
    server = ServerProcess(model_repository, env={"PIPESERVE_GRACE_PERIOD": "60", "PIPESERVE_LOAD_MODELS": "minilm sentiment"})
    server.start()
    try:
        channel = grpc.insecure_channel(server.target)
        embed = fe_grpc.FeatureExtractionServiceStub(channel)
        # A slow call: many long inputs through MiniLM take seconds on a small CPU.
        slow = embed.Embed.future(fe_pb.EmbedRequest(inputs=["a long sentence about many things " * 16] * 64, pooling=fe_pb.POOLING_MEAN), timeout=120)
        deadline = time.monotonic() + 10
        while not _in_flight(server.target) and time.monotonic() < deadline:
            time.sleep(0.02)
        server.signal(signal.SIGTERM)
        # Readiness goes NOT_SERVING while the listener still answers...
        deadline = time.monotonic() + 10
        while health(server.target, "readiness") != NOT_SERVING:
            assert time.monotonic() < deadline, "readiness never flipped"
            time.sleep(0.02)
        assert health(server.target, "liveness") == SERVING
        # ...new calls are refused...
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.TextClassificationServiceStub(channel).Classify(pb.ClassifyRequest(inputs=["x"]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # ...and the call in flight completes.
        assert len(slow.result().embeddings) == 64
        assert server.wait(60) == 0
        channel.close()
    finally:
        server.stop()
    assert "draining" in server.log()


def _in_flight(target: str) -> bool:
    from pipeserve.v1 import model_service_pb2 as ms_pb
    from pipeserve.v1 import model_service_pb2_grpc as ms_grpc

    with grpc.insecure_channel(target) as channel:
        stats = ms_grpc.ModelServiceStub(channel).GetModelStatistics(ms_pb.GetModelStatisticsRequest(name="minilm"), timeout=5)
    return any(m.in_flight for m in stats.models)
