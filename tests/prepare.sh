#!/usr/bin/env bash
# What the test suite needs beyond the Python packages: each step is idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
for step in tests/prepare.d/*.sh; do
  [ -e "$step" ] || continue
  echo "== prepare: $step"
  bash "$step"
done
