"""transformers 4.57's summarization and translation pipelines as the reference, in their own
virtualenv (.venv-transformers4, made by tests/prepare.d/transformers4.sh): transformers 5 has no
such pipelines.

Imported by the tests, `reference(cases)` runs every case in ONE subprocess (the import of torch
and transformers costs seconds) and returns each case's result, or {"error": ...}. Run as a
script in the 4.x venv, this file answers: cases on stdin (JSON), results on stdout.

A tokenizer saved by transformers 5 writes `extra_special_tokens` as a list, which 4.x cannot read
('list' object has no attribute 'keys'): 4.x gets a copy of the model folder (its files linked)
whose tokenizer_config.json has that list as 4.x writes it, `additional_special_tokens`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("PIPESERVE_TRANSFORMERS4_VENV", ROOT / ".venv-transformers4"))


def available() -> bool:
    return (VENV / ".installed").is_file() and (VENV / "bin" / "python").is_file()


def folder_for_4x(folder: Path, into: Path) -> Path:
    """`folder` as transformers 4.x can load it (see the module docstring)."""
    copy = into / folder.name
    if copy.exists():
        return copy
    copy.mkdir(parents=True)
    for item in folder.iterdir():
        if item.name == "tokenizer_config.json":
            config = json.loads(item.read_text())
            extra = config.pop("extra_special_tokens", None)
            if isinstance(extra, list):
                config["additional_special_tokens"] = extra
            elif extra is not None:
                config["extra_special_tokens"] = extra
            (copy / item.name).write_text(json.dumps(config))
        elif not item.name.startswith("."):
            (copy / item.name).symlink_to(item.resolve())
    return copy


def reference(cases: list[dict[str, Any]], tmp: Path, timeout: float = 600) -> list[Any]:
    """Each case {"task", "folder", "inputs", "kwargs", "seed"?} run by 4.57's pipeline; or a
    {"signatures": true} case: 4.57's pipeline parameters, generate() and GenerationConfig."""
    prepared = []
    for case in cases:
        case = dict(case)
        if "folder" in case:
            case["folder"] = str(folder_for_4x(Path(case["folder"]), tmp))
        prepared.append(case)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(VENV / "bin" / "python"), __file__], input=json.dumps(prepared), text=True,
                          capture_output=True, env=env, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the transformers 4.x reference failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# -- the 4.x side -------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _signatures() -> dict[str, Any]:
    import inspect

    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin
    from transformers.pipelines.text2text_generation import (
        SummarizationPipeline,
        Text2TextGenerationPipeline,
        TranslationPipeline,
    )

    def names(fn):
        return [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"]

    config = GenerationConfig()
    return {
        "text2text": names(Text2TextGenerationPipeline._sanitize_parameters),
        "summarization": names(SummarizationPipeline._sanitize_parameters),
        "translation": names(TranslationPipeline._sanitize_parameters),
        "generate": names(GenerationMixin.generate),
        "generation_config": sorted(k for k in vars(config) if not k.startswith("_")),
        "generation_config_defaults": {k: v for k, v in config.to_dict().items()
                                       if v is not None and not k.startswith("_") and k != "transformers_version"},
    }


def _main() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    pipelines: dict[tuple[str, str], Any] = {}
    out = []
    for case in json.loads(sys.stdin.read()):
        if case.get("signatures"):
            out.append(_signatures())
            continue
        try:
            key = (case["task"], case["folder"])
            if key not in pipelines:
                pipelines[key] = transformers.pipeline(case["task"], model=case["folder"])
            kwargs = dict(case.get("kwargs", {}))
            if isinstance(kwargs.get("return_type"), int):  # ReturnType by its value, as JSON carries it
                from transformers.pipelines.text2text_generation import ReturnType

                kwargs["return_type"] = ReturnType(kwargs["return_type"])
            if isinstance(kwargs.get("generation_config"), dict):
                kwargs["generation_config"] = transformers.GenerationConfig(**kwargs["generation_config"])
            if case.get("seed") is not None:
                torch.manual_seed(case["seed"])
            out.append(_plain(pipelines[key](case["inputs"], **kwargs)))
        except Exception as exc:  # the case's answer: transformers refused it
            out.append({"error": f"{type(exc).__name__}: {exc}"})
    print(json.dumps(out))


if __name__ == "__main__":
    _main()
