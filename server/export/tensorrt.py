"""`pipeserve export --backend tensorrt MODEL`: the TensorRT path, through Triton.

TensorRT needs a GPU and builds a plan for one GPU model and TensorRT version, so the export
stops at what is portable and says how to finish on the GPU machine:

    <triton_repository>/<name>/config.pbtxt     Triton's config, platform tensorrt_plan
    <triton_repository>/<name>/<v>/model.onnx   the model, checked against eager in onnxruntime
    <triton_repository>/<name>/build_plan.sh    trtexec: <v>/model.onnx -> <v>/model.plan
    <triton_repository>/<name>/README.md        the steps
    <repository>/<name>/config.pbtxt            pipeserve's model: backend triton pointing at it,
    <repository>/<name>/tokenizer.json ...      with the task's tokenizer or processor files

pipeserve keeps pre- and post-processing, batching and the API; Triton runs the plan. Each export
adds Triton version v+1; the pipeserve config leaves model_version unset, so Triton's version
policy (newest by default) decides which plan answers.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeserve.server.export.source import (
    CHECK_BATCH, CHECK_DECODER_LENGTH, CHECK_LENGTH, TRACE_BATCH, TRACE_DECODER_LENGTH, TRACE_LENGTH,
    ExportError, ExportSource, wrap)
from pipeserve.server.export.versions import add_version, sibling_config, write_config

log = logging.getLogger("pipeserve.export")

TOLERANCE = 1e-4
ONNX_FILE = "model.onnx"
PLAN_FILE = "model.plan"
OPSET = 17
# The KServe v2 / Triton datatypes of the torch dtypes a model takes and returns.
_DATATYPES = {torch.int64: "INT64", torch.int32: "INT32", torch.float32: "FP32", torch.float16: "FP16",
              torch.bool: "BOOL", torch.int8: "INT8", torch.uint8: "UINT8", torch.float64: "FP64"}


@dataclass(frozen=True)
class TensorShape:
    """A tensor of the exported model: its dims with the batch first, -1 where a dim varies."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    # Names of the varying dims (for ONNX dynamic axes), by position.
    dynamic: dict[int, str]


@dataclass(frozen=True)
class TensorRTExport:
    model_name: str
    triton_version: int
    onnx_path: Path
    plan_path: Path
    triton_config_path: Path
    build_script: Path
    pipeserve_config_path: Path
    inputs: tuple[TensorShape, ...]
    outputs: tuple[TensorShape, ...]
    max_difference: dict[str, float]


def _shapes(trace: dict[str, torch.Tensor], check: dict[str, torch.Tensor]) -> tuple[TensorShape, ...]:
    """Which dims vary, found by comparing the two example batches (and the outputs they give)."""
    named = {(TRACE_BATCH, CHECK_BATCH): "batch", (TRACE_LENGTH, CHECK_LENGTH): "sequence",
             (TRACE_DECODER_LENGTH, CHECK_DECODER_LENGTH): "decoder_sequence"}
    shapes = []
    for name, a in trace.items():
        b = check[name]
        if a.dtype not in _DATATYPES:
            raise ExportError(f"tensor {name!r} has dtype {a.dtype}, which the TensorRT path does not carry")
        dynamic = {i: named.get((x, y), f"{name}_{i}") for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y}
        if 0 not in dynamic:
            raise ExportError(f"tensor {name!r} has no batch dimension first ({tuple(a.shape)})")
        dims = tuple(-1 if i in dynamic else int(x) for i, x in enumerate(a.shape))
        shapes.append(TensorShape(name, _DATATYPES[a.dtype], dims, dynamic))
    return tuple(shapes)


def export_onnx(source: ExportSource, path: Path) -> tuple[tuple[TensorShape, ...], tuple[TensorShape, ...], dict[str, float]]:
    """Writes the ONNX model; returns its inputs, outputs and the largest difference from eager in
    onnxruntime on a batch of other shapes (empty when onnxruntime is not installed)."""
    output_names = source.output_names()
    example, check = source.example_inputs(), source.example_inputs(check=True)
    inputs = _shapes(example, check)
    outputs = _shapes(source.eager_outputs(example), source.eager_outputs(check))
    outputs = tuple(o for o in outputs if o.name in output_names)
    dynamic_axes = {t.name: t.dynamic for t in inputs + outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(wrap(source, output_names), tuple(example[n] for n in source.input_names), str(path),
                          dynamo=False, input_names=list(source.input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True)
    return inputs, outputs, check_with_onnxruntime(source, path, check)


def check_with_onnxruntime(source: ExportSource, path: Path, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    try:
        import onnxruntime
    except ImportError:
        log.warning("onnxruntime is not installed: %s is not checked against eager", path)
        return {}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {k: v.numpy() for k, v in batch.items()})))
    want = source.eager_outputs(batch)
    diffs = {n: float(abs(got[n] - want[n].numpy()).max()) for n in names}
    bad = {n: d for n, d in diffs.items() if not d <= TOLERANCE}
    if bad:
        raise ExportError(f"the ONNX model differs from eager in onnxruntime by {bad} (tolerance {TOLERANCE})")
    return diffs


def triton_config_text(name: str, max_batch_size: int, inputs: tuple[TensorShape, ...],
                       outputs: tuple[TensorShape, ...]) -> str:
    """Triton's config.pbtxt for the plan, written through Triton's own ModelConfig message (whose
    str() is protobuf text format)."""
    from tritonclient.grpc import model_config_pb2 as triton

    config = triton.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=max_batch_size)
    for shape in inputs:
        config.input.add(name=shape.name, data_type=triton.DataType.Value(f"TYPE_{shape.datatype}"), dims=shape.dims[1:])
    for shape in outputs:
        config.output.add(name=shape.name, data_type=triton.DataType.Value(f"TYPE_{shape.datatype}"), dims=shape.dims[1:])
    config.instance_group.add(kind=triton.ModelInstanceGroup.KIND_GPU, count=1)
    config.dynamic_batching.max_queue_delay_microseconds = 100
    return str(config)


def trtexec_shapes(inputs: tuple[TensorShape, ...], batch: int, length: int) -> str:
    parts = []
    for shape in inputs:
        dims = [batch if i == 0 else (length if i in shape.dynamic else d) for i, d in enumerate(shape.dims)]
        parts.append(f"{shape.name}:{'x'.join(map(str, dims))}")
    return ",".join(parts)


def build_script_text(name: str, version: int, inputs: tuple[TensorShape, ...], max_batch_size: int,
                      max_length: int) -> str:
    opt_batch, opt_length = max(1, max_batch_size // 2), min(128, max_length)
    return f"""#!/usr/bin/env bash
# Builds the TensorRT plan that Triton serves as model {name!r}, from the ONNX model next to it.
# Run it on the GPU machine that runs Triton: a plan fits one GPU model and one TensorRT version.
# Needs trtexec from TensorRT 10 or newer (INT64 inputs); e.g. in the nvcr.io/nvidia/tritonserver
# image of the same release as the server, at /usr/src/tensorrt/bin/trtexec.
#
#   bash build_plan.sh [VERSION]        (default {version}); extra flags: TRTEXEC_ARGS="--fp16"
#
# Shapes: batch 1..{max_batch_size}; sequence 1..{max_length} (pipeserve truncates to it).
set -euo pipefail
cd "$(dirname "$0")"
VERSION="${{1:-{version}}}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" --onnx="$VERSION/{ONNX_FILE}" --saveEngine="$VERSION/{PLAN_FILE}" \\
  --minShapes={trtexec_shapes(inputs, 1, 1)} \\
  --optShapes={trtexec_shapes(inputs, opt_batch, opt_length)} \\
  --maxShapes={trtexec_shapes(inputs, max_batch_size, max_length)} \\
  ${{TRTEXEC_ARGS:-}}
echo "built $VERSION/{PLAN_FILE}; Triton loads it (or: curl -X POST localhost:8000/v2/repository/models/{name}/load)"
"""


def readme_text(name: str, version: int, source_label: str, pipeserve_name: str, url: str) -> str:
    return f"""# {name}: {source_label} as a TensorRT plan for Triton

Written by `pipeserve export --backend tensorrt`. On the GPU machine that runs Triton:

1. `bash build_plan.sh` builds `{version}/{PLAN_FILE}` from `{version}/{ONNX_FILE}` with trtexec.
2. Serve this folder's parent with Triton: `tritonserver --model-repository <this repository>`.
3. pipeserve's model `{pipeserve_name}` (backend triton) calls it at `{url}`; change
   `backend_parameters.url` in its config.pbtxt if Triton listens elsewhere.

The ONNX model was checked against the eager PyTorch model in onnxruntime (CPU) to {TOLERANCE};
a plan built without `--fp16` keeps FP32 and should stay close to it.
"""


def export_tensorrt(repository: Path, model: str, triton_repository: Path, name: str = "", version: int = 0,
                    triton_url: str = "localhost:8001", max_sequence_length: int = 0) -> TensorRTExport:
    source = ExportSource.open(repository, model, version)
    if source.is_generation:
        raise ExportError(f"model {model!r} generates text ({source.model_class}); the TensorRT export covers "
                          "encoder tasks: generation needs a KV-cache engine (e.g. TensorRT-LLM). Serve it with "
                          "backend eager, or export a no-cache decoder step with --backend torchscript")
    name, pipeserve_folder, keep_config = source.target(name, "tensorrt", "triton")
    max_batch_size = source.settings.max_batch_size
    max_length = (max_sequence_length or source.settings.max_sequence_length
                  or getattr(source.hf_config, "max_position_embeddings", 0) or 512)

    triton_folder = Path(triton_repository).resolve() / name
    found: dict = {}

    def write_version(dest: Path) -> None:
        dest.mkdir(parents=True)
        found["shapes"] = export_onnx(source, dest / ONNX_FILE)

    triton_version, version_folder = add_version(triton_folder, write_version)
    inputs, outputs, diffs = found["shapes"]
    triton_config = triton_folder / "config.pbtxt"
    triton_config.write_text(triton_config_text(name, max_batch_size, inputs, outputs), encoding="utf-8")
    script = triton_folder / "build_plan.sh"
    script.write_text(build_script_text(name, triton_version, inputs, max_batch_size, max_length), encoding="utf-8")
    script.chmod(0o755)
    (triton_folder / "README.md").write_text(readme_text(name, triton_version, source.label, name, triton_url),
                                             encoding="utf-8")

    source.copy_support_files(pipeserve_folder)
    pipeserve_config = pipeserve_folder / "config.pbtxt"
    if not keep_config:
        config = sibling_config(source.config_fields, name, "triton")
        config["max_sequence_length"] = max_length
        # Instances of a remote backend are concurrent callers: two keep Triton's batcher fed.
        config["instance_group"] = [{"count": 2, "kind": "KIND_CPU"}]
        config["backend_parameters"] = {
            "url": triton_url,
            "model_name": name,
            "inputs": ",".join(f"{t.name}:{t.datatype}" for t in inputs),
            "outputs": ",".join(f"{t.name}:{t.datatype}" for t in outputs),
        }
        write_config(pipeserve_folder, config)
    log.info("exported %s for TensorRT: Triton %s version %d, pipeserve %s", source.label, triton_folder,
             triton_version, pipeserve_folder)
    return TensorRTExport(name, triton_version, version_folder / ONNX_FILE, version_folder / PLAN_FILE,
                          triton_config, script, pipeserve_config, inputs, outputs, diffs)
