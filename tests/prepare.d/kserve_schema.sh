#!/usr/bin/env bash
# KServe's Python SDK wheel, as data: tests/kserve_schema.py reads the OpenAPI models it ships
# (without installing or importing kserve and its many dependencies) to validate
# deploy/kserve/*.yaml offline. Downloaded once into the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.venv/share/pipeserve-test
wheel=kserve-0.21.0-py3-none-any.whl
if [ -f "$dest/$wheel" ]; then
  echo "$dest/$wheel present"
  exit 0
fi
mkdir -p "$dest"
.venv/bin/python -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  "kserve==0.21.0" -d "$dest" || echo "could not download $wheel: the KServe manifest tests will be skipped"
