"""transformers 4.x's pipelines as the reference for what transformers 5 removed or changed.

question-answering left transformers 5's pipeline(), and text-classification's return_all_scores
lost its meaning there; pipeserve serves them with 4.x's semantics. `answer_cases` runs a batch of
cases through transformers 4.57's own pipelines in ONE subprocess of the reference virtualenv
(.venv-transformers4, made by tests/prepare.d/transformers4.sh), so a test module pays its start
(a few seconds) once. A case is (task, model folder, positional args, keyword args): unlike
tests/transformers4_generation.py's (one input per call, for summarization and translation), a
call here may have no positional argument (question=, context=) or several; its answer is the
pipeline's result as JSON (numbers as floats), or {"error": type, "message": ...}. Model folders
are copied as that module copies them (folder_for_4x).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.transformers4_generation import VENV, available, folder_for_4x

PYTHON = VENV / "bin" / "python"

# Runs in the 4.x virtualenv: reads the cases as JSON on stdin, writes the answers as JSON on stdout.
_SCRIPT = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
from transformers import pipeline
from transformers.utils import logging
logging.set_verbosity_error()

def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value

pipelines = {}
answers = []
for case in json.load(sys.stdin):
    key = (case["task"], case["model"], json.dumps(case.get("init", {}), sort_keys=True))
    try:
        if key not in pipelines:
            pipelines[key] = pipeline(case["task"], model=case["model"], **case.get("init", {}))
        answers.append(plain(pipelines[key](*case["args"], **case["kwargs"])))
    except Exception as exc:
        answers.append({"error": type(exc).__name__, "message": str(exc)})
json.dump(answers, sys.stdout)
'''


def require() -> None:
    """Skips the calling test where the reference virtualenv is missing (run tests/prepare.sh)."""
    if not available():
        pytest.skip(f"{VENV} is missing: run bash tests/prepare.d/transformers4.sh (make test does)")


def answer_cases(cases: list[tuple[str, Path, list[Any], dict[str, Any]]], workdir: Path,
                 init: dict[str, Any] | None = None, timeout: float = 600) -> list[Any]:
    """transformers 4.x's answers to (task, model folder, args, kwargs) cases, in order."""
    require()
    payload = [{"task": task, "model": str(folder_for_4x(Path(folder), workdir)), "args": list(args),
                "kwargs": kwargs, "init": init or {}} for task, folder, args, kwargs in cases]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(PYTHON), "-c", _SCRIPT], input=json.dumps(payload), capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=workdir)
    if done.returncode != 0:
        raise RuntimeError(f"the transformers 4.x reference failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)
