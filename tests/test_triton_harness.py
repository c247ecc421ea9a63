"""The real-Triton harness: a real tritonserver serves a tiny BERT classifier; we call it over gRPC.

Checks what pipeserve's Triton backend relies on: the model contract (names, dtypes, batching),
numerics equal to the in-process model, a stopped server that the client sees as UNAVAILABLE,
and a restart on the same port that the same client object reaches again.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.triton_server.harness import TritonProcess, require_triton

pytestmark = [pytest.mark.triton, pytest.mark.slow]

MODEL_NAME = "tiny-bert-cls"


@pytest.fixture(scope="module")
def triton_venv() -> Path:
    # Skips only where the machine cannot run Triton at all; otherwise builds .venv-triton once
    # (a minute or two on CI), and a failed build fails the test.
    return require_triton()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=1000,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        # Larger than BERT's 0.02, so logits are O(0.1..1) and atol=1e-4 means something.
        initializer_range=0.3,
    )
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(path)
    return path


def _batch() -> tuple[np.ndarray, np.ndarray]:
    input_ids = np.array([[101, 17, 230, 42, 999, 102], [101, 56, 102, 0, 0, 0]], dtype=np.int64)
    attention_mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=np.int64)
    return input_ids, attention_mask


def _infer(client, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array in (("input_ids", input_ids), ("attention_mask", attention_mask)):
        tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(MODEL_NAME, inputs, outputs=[grpcclient.InferRequestedOutput("logits")], client_timeout=30)
    return result.as_numpy("logits")


def _reference_logits(model_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return out.logits.float().numpy()


@pytest.mark.timeout(1200)  # the first run on a machine builds .venv-triton
def test_real_triton_serves_stops_and_restarts_on_the_same_port(triton_venv: Path, tiny_bert: Path) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    input_ids, attention_mask = _batch()
    expected = _reference_logits(tiny_bert, input_ids, attention_mask)
    assert np.abs(expected).max() > 0.05, "reference logits too small for a meaningful comparison"

    with TritonProcess(tiny_bert, MODEL_NAME, kind="sequence-classification", venv=triton_venv) as triton:
        url = triton.grpc_url
        print(f"triton start: {triton.last_start_seconds:.1f}s")
        assert url.startswith("127.0.0.1:")
        client = grpcclient.InferenceServerClient(url)
        try:
            # The contract pipeserve's Triton backend is written against.
            config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
            assert int(config["max_batch_size"]) == 32
            assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
                ("input_ids", "TYPE_INT64", ["-1"]),
                ("attention_mask", "TYPE_INT64", ["-1"]),
            ]
            assert [(t["name"], t["data_type"], t["dims"]) for t in config["output"]] == [
                ("logits", "TYPE_FP32", ["-1"])
            ]

            got = _infer(client, input_ids, attention_mask)
            assert got.shape == (2, 3) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
            # Padding is honoured: the padded row equals the same sequence sent unpadded, alone.
            alone = _infer(client, input_ids[1:, :3], attention_mask[1:, :3])
            np.testing.assert_allclose(alone[0], got[1], atol=1e-4, rtol=0)

            # Stopped: the same client gets an UNAVAILABLE-class error, promptly.
            triton.stop()
            assert not triton.is_running()
            t0 = time.monotonic()
            with pytest.raises(InferenceServerException) as excinfo:
                _infer(client, input_ids, attention_mask)
            assert time.monotonic() - t0 < 10
            error = f"{excinfo.value.status()} {excinfo.value.message()}"
            assert "UNAVAILABLE" in error.upper(), error

            # Restarted on the same port: the same client object reaches it again.
            triton.restart()
            print(f"triton restart: {triton.last_start_seconds:.1f}s")
            assert triton.grpc_url == url
            t0 = time.monotonic()
            failures = 0
            while True:  # the channel may still be in reconnect backoff for a moment
                try:
                    again = _infer(client, input_ids, attention_mask)
                    break
                except InferenceServerException:
                    failures += 1
                    if time.monotonic() - t0 > 30:
                        raise
                    time.sleep(0.2)
            print(f"same client back after {time.monotonic() - t0:.1f}s ({failures} failed calls); stop said: {error}")
            np.testing.assert_allclose(again, expected, atol=1e-4, rtol=0)
        finally:
            client.close()
