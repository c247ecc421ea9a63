"""Serve a saved Hugging Face model from a real Triton Inference Server (through PyTriton).

Runs inside the Triton virtualenv made by ``setup_venv.sh`` (Debian's python3.11, numpy<2,
nvidia-pytriton), never in pipeserve's main venv. Tests start it through ``harness.TritonProcess``.

    python serve_model.py --model-dir DIR --model-name NAME \
        --grpc-port P --http-port P2 --metrics-port P3 \
        [--kind sequence-classification|token-logits|hidden-states] \
        [--output TRITON_NAME[=ATTR] ...] [--input NAME ...]

Model contract (what pipeserve's Triton backend talks to):
  inputs   ``input_ids`` INT64 [-1], ``attention_mask`` INT64 [-1]  (batched: the leading dim is
           the batch, max_batch_size 32 by default; extra ``--input`` names, e.g. token_type_ids,
           are added as optional INT64 [-1] inputs)
  outputs  FP32, by kind:
             sequence-classification  ``logits``            [-1]        (num_labels)
             token-logits             ``logits``            [-1, -1]    (seq, labels or vocab)
             hidden-states            ``last_hidden_state`` [-1, -1]    (seq, hidden)
           ``--output NAME=ATTR`` (repeatable) replaces them: Triton tensor NAME carries the
           model output attribute ATTR (``--output logits`` alone means ``logits=logits``).

The model is loaded once, on CPU, in eval mode; every batch runs under ``torch.inference_mode``.
Prints ``READY`` (one line, flushed) once Triton serves the model; SIGTERM or SIGINT stops Triton
and the process exits 0. Exits non-zero if Triton or the model dies underneath it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import numpy as np

T_PROCESS = time.monotonic()  # start-up is reported from here, imports included

KINDS = {
    # kind: (transformers Auto class, default outputs as [(triton name, attribute)])
    "sequence-classification": ("AutoModelForSequenceClassification", [("logits", "logits")]),
    "token-logits": ("AutoModelForTokenClassification", [("logits", "logits")]),
    "hidden-states": ("AutoModel", [("last_hidden_state", "last_hidden_state")]),
}

REQUIRED_INPUTS = ("input_ids", "attention_mask")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True, help="directory written by save_pretrained")
    p.add_argument("--model-name", required=True, help="name the model has in Triton")
    p.add_argument("--kind", choices=sorted(KINDS), default="sequence-classification")
    p.add_argument(
        "--auto-class",
        default=None,
        help="transformers Auto class to load with (default by kind), e.g. AutoModelForMaskedLM",
    )
    p.add_argument(
        "--output",
        action="append",
        default=None,
        metavar="NAME[=ATTR]",
        help="output tensor NAME carrying model output attribute ATTR (repeatable; default by kind)",
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME",
        help="extra optional INT64 [-1] input passed to the model as a keyword (e.g. token_type_ids)",
    )
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--address", default="127.0.0.1", help="address Triton's endpoints bind to")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="Triton dynamic batcher: how long a request may wait for others to batch with",
    )
    p.add_argument("--delay-ms", type=float, default=0.0, help="sleep this long in every batch (tests)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--workspace", default=None, help="PyTriton workspace dir (must not exist yet)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return p.parse_args(argv)


def parse_outputs(specs: list[str] | None, kind: str) -> list[tuple[str, str]]:
    if not specs:
        return list(KINDS[kind][1])
    outputs = []
    for spec in specs:
        name, _, attr = spec.partition("=")
        outputs.append((name.strip(), (attr or name).strip()))
    names = [n for n, _ in outputs]
    if len(set(names)) != len(names):
        raise SystemExit(f"serve_model: duplicate output names in {specs}")
    return outputs


def load_model(model_dir: str, auto_class_name: str):
    import torch
    import transformers

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"serve_model: {model_dir!r} has no config.json (cwd {os.getcwd()})")
    auto_class = getattr(transformers, auto_class_name, None)
    if auto_class is None:
        raise SystemExit(f"serve_model: transformers has no class {auto_class_name!r}")
    model = auto_class.from_pretrained(model_dir, dtype=torch.float32)
    model.to("cpu")
    model.eval()
    return model


def probe_output_ranks(model, outputs, input_names):
    """Run a 1x2 dummy batch to learn each output's rank, so shapes can be declared as [-1]*(rank-1)."""
    import torch

    feeds = {name: torch.zeros((1, 2), dtype=torch.long) for name in input_names}
    feeds["attention_mask"] = torch.ones((1, 2), dtype=torch.long)
    with torch.inference_mode():
        result = model(**feeds)
    ranks = {}
    for name, attr in outputs:
        value = getattr(result, attr, None)
        if value is None and hasattr(result, "get"):
            value = result.get(attr)
        if not isinstance(value, torch.Tensor):
            available = [k for k, v in result.items() if isinstance(v, torch.Tensor)]
            raise SystemExit(
                f"serve_model: model output has no tensor {attr!r} (for output {name!r}); "
                f"it has {available}"
            )
        ranks[name] = value.dim()
    return ranks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    log = logging.getLogger("serve_model")

    stop = threading.Event()
    state = {"serving": False, "aborting": False}

    def _on_signal(signum, _frame):
        log.info("signal %d received, stopping", signum)
        stop.set()
        if not state["serving"] and not state["aborting"]:
            # Still starting (PyTriton may poll a dead tritonserver for minutes): abort the start
            # from wherever the main thread is; the finally below still stops Triton.
            state["aborting"] = True
            raise SystemExit(0)

    # Install before the slow part, so a SIGTERM during start-up still ends in a clean stop.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    import torch

    torch.set_num_threads(max(1, args.torch_threads))

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    t0 = time.monotonic()
    auto_class = args.auto_class or KINDS[args.kind][0]
    outputs = parse_outputs(args.output, args.kind)
    extra_inputs = [n for n in args.input if n not in REQUIRED_INPUTS]
    model = load_model(args.model_dir, auto_class)
    ranks = probe_output_ranks(model, outputs, list(REQUIRED_INPUTS) + extra_inputs)
    t_loaded = time.monotonic()
    log.info(
        "loaded %s from %s with %s in %.2fs (imports took %.2fs)",
        args.kind, args.model_dir, auto_class, t_loaded - t0, t0 - T_PROCESS,
    )
    delay_s = args.delay_ms / 1000.0

    @batch
    def infer(**inputs):
        if delay_s:
            time.sleep(delay_s)
        feeds = {name: torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64)) for name, arr in inputs.items()}
        with torch.inference_mode():
            result = model(**feeds)
        return {name: getattr(result, attr).float().numpy() for name, attr in outputs}

    inputs = [Tensor(name=n, dtype=np.int64, shape=(-1,)) for n in REQUIRED_INPUTS]
    inputs += [Tensor(name=n, dtype=np.int64, shape=(-1,), optional=True) for n in extra_inputs]
    out_tensors = [Tensor(name=n, dtype=np.float32, shape=(-1,) * (ranks[n] - 1)) for n, _ in outputs]

    config = TritonConfig(
        grpc_address=args.address,
        grpc_port=args.grpc_port,
        http_address=args.address,
        http_port=args.http_port,
        metrics_address=args.address,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        exit_timeout_secs=5,
    )
    triton = Triton(config=config, workspace=args.workspace)
    try:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=inputs,
            outputs=out_tensors,
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us),
            ),
            strict=True,
        )
        if stop.is_set():
            return 0
        triton.run()
        log.info(
            "serving %r on grpc %s:%d http %s:%d metrics %s:%d (start-up %.2fs, model load %.2fs)",
            args.model_name,
            args.address,
            args.grpc_port,
            args.address,
            args.http_port,
            args.address,
            args.metrics_port,
            time.monotonic() - T_PROCESS,
            t_loaded - t0,
        )
        state["serving"] = True
        print("READY", flush=True)
        while not stop.wait(0.5):
            if not triton.is_alive():
                log.error("Triton server or the model's proxy died")
                return 3
        return 0
    finally:
        triton.stop()
        log.info("stopped")


if __name__ == "__main__":
    sys.exit(main())
