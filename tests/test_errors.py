"""Bad requests get a clear status over the wire, and the server answers normally right after."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from pipeserve.client import pipeline
from pipeserve.v1 import text_classification_pb2 as pb
from pipeserve.v1 import text_classification_pb2_grpc as pb_grpc
from tests.conftest import server_settings
from tests.server_harness import ServerThread


def classify(target: str, **fields) -> pb.ClassifyResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.TextClassificationServiceStub(channel).Classify(pb.ClassifyRequest(**fields), timeout=30)


def expect_error(target: str, code: grpc.StatusCode, *fragments: str, **fields) -> str:
    with pytest.raises(grpc.RpcError) as info:
        classify(target, **fields)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    # The server is unharmed: a normal request is answered.
    assert len(classify(target, inputs=["still fine"]).results) == 1
    return info.value.details()


def test_unknown_model_is_not_found_and_names_the_models(target):
    expect_error(target, grpc.StatusCode.NOT_FOUND, "'nope'", "sentiment", "minilm", model="nope", inputs=["x"])


def test_unknown_version_is_not_found(target):
    expect_error(target, grpc.StatusCode.NOT_FOUND, "version 7", model="sentiment", model_version=7, inputs=["x"])


def test_model_of_another_task_is_failed_precondition(target):
    expect_error(target, grpc.StatusCode.FAILED_PRECONDITION, "feature-extraction", model="minilm", inputs=["x"])


def test_empty_input_list_names_the_field(target):
    expect_error(target, grpc.StatusCode.INVALID_ARGUMENT, "inputs", inputs=[])


def test_parameter_out_of_range_names_the_field(target):
    expect_error(target, grpc.StatusCode.INVALID_ARGUMENT, "top_k", inputs=["x"], top_k=-3)


def test_unknown_enum_value_is_invalid(target):
    expect_error(target, grpc.StatusCode.INVALID_ARGUMENT, "function_to_apply", inputs=["x"], function_to_apply=42)


def test_mismatched_text_pairs(target):
    expect_error(target, grpc.StatusCode.INVALID_ARGUMENT, "text_pairs", inputs=["a", "b"], text_pairs=["c"])


def test_sdk_raises_the_same_status(target):
    with pipeline("sentiment-analysis", target=target) as clf, pytest.raises(grpc.RpcError) as info:
        clf([])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_overlong_input_is_truncated_by_default(target):
    response = classify(target, inputs=["word " * 2000])
    assert len(response.results[0].labels) == 1


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, model_repository: Path):
    """A model whose config refuses over-long inputs (truncation: TRUNCATION_REJECT)."""
    repo = tmp_path_factory.mktemp("strict")
    (repo / "strict").mkdir()
    (repo / "strict" / "config.pbtxt").write_text(
        f'task: "text-classification"\nsource {{ path: "{model_repository / "sentiment"}" }}\n'
        "max_sequence_length: 16\ntruncation: TRUNCATION_REJECT\n"
    )
    running = ServerThread(server_settings(repo)).start()
    yield running
    running.stop()


def test_overlong_input_is_rejected_where_the_config_asks(strict_server):
    details = expect_error(strict_server.target, grpc.StatusCode.INVALID_ARGUMENT, "inputs[1]", "at most 16",
                           inputs=["short", "word " * 40])
    assert "TRUNCATION_REJECT" in details
    # A batch-mate of a rejected input in another request is unaffected.
    assert len(classify(strict_server.target, inputs=["short one", "another short"]).results) == 2
