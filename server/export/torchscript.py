"""`pipeserve export --backend torchscript MODEL`: trace the eager model into a new version of
`<model>-torchscript` that backends/torchscript.py serves with torch.jit.load.

Tracing (not scripting) is what works across transformers models; its known trap is a frozen
shape or branch. So every export is checked before it is written: the traced model runs a batch
of another size (and another padding) than it was traced with, and must match eager to 1e-4.
Decoder-only generation models export a step without a KV cache (logits for every position of
the ids given), which the backend's prefill/decode run again over the whole sequence; encoder-
decoder models are refused (their tasks call generate(), which needs a cache).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeserve.backends.torchscript import MODEL_FILE, InputSpec, TorchScriptSignature
from pipeserve.server.export.source import ExportError, ExportSource, max_difference, wrap
from pipeserve.server.export.versions import add_version, sibling_config, write_config

log = logging.getLogger("pipeserve.export")

TOLERANCE = 1e-4

# Inputs a task may leave out, and what the transformers model assumes then.
_OPTIONAL_INPUTS = {"token_type_ids": ("zeros", "input_ids"), "attention_mask": ("ones", "input_ids"),
                    "decoder_attention_mask": ("ones", "decoder_input_ids")}


@dataclass(frozen=True)
class TorchScriptExport:
    model_name: str
    version: int
    folder: Path
    signature: TorchScriptSignature
    max_difference: dict[str, float]
    config_written: bool


def trace(source: ExportSource) -> tuple[torch.jit.ScriptModule, TorchScriptSignature, dict[str, float]]:
    """Traces the model and checks it on a batch of other shapes; returns (module, signature, diffs)."""
    output_names = source.output_names()
    wrapper = wrap(source, output_names)
    example = source.example_inputs()
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag Python-side conversions; the check below is what decides.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, tuple(example[n] for n in source.input_names), strict=False,
                                 check_trace=False)
    check = source.example_inputs(check=True)
    expected = source.eager_outputs(check)
    with torch.inference_mode():
        got = dict(zip(output_names, traced(*(check[n] for n in source.input_names))))
    diffs = max_difference({n: expected[n] for n in output_names}, got)
    bad = {n: d for n, d in diffs.items() if not d <= TOLERANCE}
    if bad:
        raise ExportError(f"the traced {type(source.model).__name__} differs from eager on a batch of other shapes "
                          f"by {bad} (tolerance {TOLERANCE}); it has shape-dependent code tracing cannot keep: "
                          "serve it with backend eager")
    inputs = tuple(_input_spec(n, example[n], required=n in source.task_input_names) for n in source.input_names)
    signature = TorchScriptSignature(
        inputs=inputs, outputs=output_names, ignored_inputs=source.ignored_inputs, task=source.task_name,
        exported_from=source.label, model_class=type(source.model).__name__,
        kind="decoder-step" if source.is_generation else "encoder", torch_version=torch.__version__,
    )
    return traced, signature, diffs


def _input_spec(name: str, example: torch.Tensor, required: bool) -> InputSpec:
    default, like = ("", "") if required else _OPTIONAL_INPUTS.get(name, ("", ""))
    return InputSpec(name=name, dtype=str(example.dtype).removeprefix("torch."), default=default, like=like)


def export_torchscript(repository: Path, model: str, name: str = "", version: int = 0) -> TorchScriptExport:
    """Exports `model` of `repository` as the next version of `name` (default `<model>-torchscript`)."""
    source = ExportSource.open(repository, model, version)
    if source.is_generation and getattr(source.hf_config, "is_encoder_decoder", False):
        raise ExportError(f"model {model!r} is an encoder-decoder ({source.model_class}): its tasks need generate() "
                          "with a KV cache, which a traced model cannot carry; serve it with backend eager "
                          "(decoder-only models export a decoder step without a cache)")
    name, folder, config_exists = source.target(name, "torchscript", "torchscript")
    traced, signature, diffs = trace(source)

    def write(dest: Path) -> None:
        source.copy_support_files(dest)
        traced.save(str(dest / MODEL_FILE))
        signature.write(dest)

    number, final = add_version(folder, write)
    if not config_exists:
        write_config(folder, sibling_config(source.config_fields, name, "torchscript"))
    log.info("exported %s as %s version %d (max difference from eager %s)", source.label, name, number, diffs)
    return TorchScriptExport(name, number, final, signature, diffs, not config_exists)
