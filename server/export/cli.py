"""`pipeserve export --backend {torchscript,tensorrt} MODEL`: the export subcommand."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_REPOSITORY = os.environ.get("PIPESERVE_MODEL_REPOSITORY", "model_repository")
BACKENDS = ("torchscript", "tensorrt")


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model for the torchscript backend or for TensorRT through Triton",
        description="Exports an eager model of the repository. torchscript: traces it into a new version of "
                    "<model>-torchscript (served with torch.jit.load). tensorrt: writes an ONNX model, a Triton "
                    "repository entry (platform tensorrt_plan, with the trtexec command that builds the plan on "
                    "a GPU machine) and the pipeserve model <model>-tensorrt whose triton backend calls it.")
    parser.add_argument("model", help="the eager model to export (a folder of the repository)")
    parser.add_argument("--backend", required=True, choices=BACKENDS)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"model repository (default {DEFAULT_REPOSITORY})")
    parser.add_argument("--version", type=int, default=0, help="source version (default: the newest served)")
    parser.add_argument("--name", default="", help="name of the exported model (default <model>-<backend>)")
    trt = parser.add_argument_group("tensorrt")
    trt.add_argument("--triton-repository", default="triton_repository",
                     help="Triton model repository to write the entry into (default triton_repository)")
    trt.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC address for the pipeserve config")
    trt.add_argument("--max-sequence-length", type=int, default=0,
                     help="longest sequence the TensorRT plan accepts (default: the model config's)")
    parser.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from pipeserve.server.errors import PipeserveError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its load-time notes and progress bars are not the export's output
    hf_logging.disable_progress_bar()
    try:
        if args.backend == "torchscript":
            return _torchscript(args)
        return _tensorrt(args)
    except PipeserveError as exc:
        print(f"pipeserve export: {exc.message}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pipeserve export: {exc}", file=sys.stderr)
        return 2


def _torchscript(args: argparse.Namespace) -> int:
    from pipeserve.server.export.torchscript import TOLERANCE, export_torchscript

    result = export_torchscript(Path(args.repository), args.model, args.name, args.version)
    worst = max(result.max_difference.values(), default=0.0)
    print(f"wrote {result.folder} (model {result.model_name!r} version {result.version}; "
          f"{', '.join(i.name for i in result.signature.inputs)} -> {', '.join(result.signature.outputs)}; "
          f"max difference from eager {worst:.2e} <= {TOLERANCE})")
    if result.config_written:
        print(f"wrote {result.folder.parent / 'config.pbtxt'} (backend torchscript)")
    return 0


def _tensorrt(args: argparse.Namespace) -> int:
    from pipeserve.server.export.tensorrt import export_tensorrt

    result = export_tensorrt(Path(args.repository), args.model, Path(args.triton_repository), name=args.name,
                             version=args.version, triton_url=args.triton_url,
                             max_sequence_length=args.max_sequence_length)
    print(f"wrote {result.onnx_path} (ONNX; max difference from eager in onnxruntime "
          f"{max(result.max_difference.values(), default=0.0):.2e})")
    print(f"wrote {result.triton_config_path} (Triton, platform tensorrt_plan)")
    print(f"wrote {result.build_script} (run it on the GPU machine that runs Triton: builds {result.plan_path})")
    print(f"wrote {result.pipeserve_config_path} (backend triton -> {args.triton_url} model {result.model_name!r})")
    return 0
