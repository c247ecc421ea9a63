"""A text classifier served by a real Triton Inference Server (through PyTriton), for
bench/versus_triton.py: the same work pipeserve does for text-classification, per text.

Runs inside the Triton virtualenv (.venv-triton: Debian's python3.11, nvidia-pytriton, numpy<2,
a CPU torch, transformers); imports nothing from pipeserve.

    python bench/triton_classifier_server.py --model-dir DIR --model-name NAME \
        --grpc-port P --http-port P2 --metrics-port P3 [--instances N] [--threads T]

The model takes the tensors pipeserve's KServe endpoint takes, so one client drives both:
  input   TEXT   BYTES [-1] (batched: [batch, 1], one UTF-8 text per request row)
  outputs LABEL  BYTES [1]  the best label            SCORE  FP32 [1]  its softmax score
Each batch Triton's dynamic batcher forms (up to --max-batch-size requests, waiting at most
--max-queue-delay-us for them) is tokenized with the folder's tokenizer (padded to its longest
text, truncated to the model's maximum), run forward under inference_mode, and scored with a
softmax; the best label comes from the model's id2label.

--instances N binds N model instances: PyTriton runs each in a thread of this process, as
pipeserve runs each instance of an instance_group in a worker thread; each thread sets its own
torch intra-op thread count (--threads, default: the cores split evenly among the instances).
Triton's statistics endpoint is left open (PyTriton guards it with a token by default), so that the
benchmark reads the batch sizes Triton ran. Prints READY once Triton serves the model; SIGTERM or
SIGINT stops Triton and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

# Run as a script, this folder comes first on sys.path, and its http.py (a benchmark) would shadow
# the standard library's http, which torch and tritonclient import.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="a save_pretrained folder with its tokenizer")
    p.add_argument("--model-name", required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per instance (0: cores / instances)")
    p.add_argument("--workspace", default=None, help="PyTriton workspace (must not exist yet)")
    return p.parse_args(argv)


def make_infer(model, tokenizer, labels: list[bytes], threads: int):
    """One instance's batched inference callable."""
    import torch
    from pytriton.decorators import batch

    local = threading.local()

    @batch
    def infer(TEXT: np.ndarray) -> dict[str, np.ndarray]:
        # torch keeps the intra-op thread count per calling thread: set it once in this instance's.
        if not getattr(local, "threads_set", False):
            torch.set_num_threads(threads)
            local.threads_set = True
        texts = [item.decode("utf-8") for item in TEXT.reshape(-1)]
        features = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**features).logits.float().numpy()
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = shifted / shifted.sum(axis=-1, keepdims=True)
        best = scores.argmax(axis=-1)
        return {
            "LABEL": np.array([[labels[i]] for i in best], dtype=object),
            "SCORE": scores[np.arange(len(best)), best].reshape(-1, 1).astype(np.float32),
        }

    return infer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    import torch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // args.instances)
    # The instances share one copy of the weights (inference_mode forwards only read them); each
    # has a tokenizer of its own, since a fast tokenizer is not meant to be shared between threads.
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    labels = [str(model.config.id2label[i]).encode() for i in range(model.config.num_labels)]
    infers = [make_infer(model, AutoTokenizer.from_pretrained(args.model_dir), labels, threads)
              for _ in range(args.instances)]

    config = TritonConfig(grpc_address=args.address, grpc_port=args.grpc_port,
                          http_address=args.address, http_port=args.http_port,
                          metrics_address=args.address, metrics_port=args.metrics_port, exit_timeout_secs=5)
    # The statistics open (PyTriton guards them with a token by default) so that the benchmark reads
    # the batch sizes Triton ran, as it reads pipeserve's; the rest stays guarded.
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    triton = Triton(config=config, workspace=args.workspace, security_config=security)
    try:
        triton.bind(
            model_name=args.model_name,
            infer_func=infers,
            inputs=[Tensor(name="TEXT", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="LABEL", dtype=np.bytes_, shape=(1,)),
                     Tensor(name="SCORE", dtype=np.float32, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        triton.run()
        print(f"READY {args.model_name}: {args.instances} instance(s) x {threads} thread(s)", flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                print("Triton or the model's proxy died", file=sys.stderr, flush=True)
                return 3
        return 0
    finally:
        triton.stop()


if __name__ == "__main__":
    sys.exit(main())
