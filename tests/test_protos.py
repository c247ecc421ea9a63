"""The protos are versioned, lint-clean (buf), and their generated code is never committed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def test_every_proto_is_in_the_versioned_package():
    files = sorted((PROTOS / "pipeserve" / "v1").glob("*.proto"))
    assert files
    for path in files:
        assert "package pipeserve.v1;" in path.read_text(), path


def test_generated_code_is_not_tracked_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "protos"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "_pb2" not in tracked


@pytest.mark.skipif(shutil.which("npx") is None, reason="npx (Node.js) is not installed")
def test_buf_lint_passes():
    result = subprocess.run(["npx", "--yes", "@bufbuild/buf@1.75.0", "lint"], cwd=PROTOS, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
