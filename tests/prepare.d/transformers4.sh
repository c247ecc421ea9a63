#!/usr/bin/env bash
# The transformers 4.x reference (.venv-transformers4) for the fidelity tests of the tasks that
# transformers 5 removed from pipeline() (question-answering, summarization, translation): built
# once (torch from the local wheel, transformers 4.57.x), instant afterwards. A venv made with
# other packages is rebuilt (the stamp names them).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${PIPESERVE_TRANSFORMERS4_VENV:-.venv-transformers4}"
WANT="torch==2.13.0 transformers>=4.57,<5 sentencepiece protobuf>=6.30,<7 numpy"
STAMP="$VENV/.installed"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$VENV is ready"
  exit 0
fi
started=$(date +%s)
rm -rf "$VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip --disable-pip-version-check -q install torch==2.13.0
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "transformers>=4.57,<5" sentencepiece "protobuf>=6.30,<7" numpy
echo "$WANT" > "$STAMP"
echo "$VENV built in $(( $(date +%s) - started ))s"
