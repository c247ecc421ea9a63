#!/usr/bin/env bash
# The Triton Inference Server venv (.venv-triton) for the tests marked triton: built once by
# tests/triton_server/setup_venv.sh (Debian's python3.11 with nvidia-pytriton; apt-get installs
# python3.11 where it is missing and we are root), instant afterwards. Where the harness says this
# machine cannot run Triton (not Linux x86_64, no Debian python3.11 and no apt, or
# PIPESERVE_SKIP_TRITON=1 outside CI) it is skipped, and so are those tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
rc=0
reason=$(.venv/bin/python -c '
import sys
from tests.triton_server.harness import triton_available
ok, why = triton_available()
print(why)
sys.exit(0 if ok else 3)
') || rc=$?
if [[ $rc == 3 ]]; then
  echo "Triton tests will be skipped: $reason"
  exit 0
elif [[ $rc != 0 ]]; then
  echo "tests/triton_server/harness.py failed (exit $rc)"
  exit "$rc"
fi
echo "$reason"
bash tests/triton_server/setup_venv.sh "${PIPESERVE_TRITON_VENV:-.venv-triton}"
