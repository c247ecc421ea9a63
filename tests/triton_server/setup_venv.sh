#!/usr/bin/env bash
# Create the virtualenv that runs a real Triton Inference Server for pipeserve's tests.
#
#   bash tests/triton_server/setup_venv.sh [VENV_DIR]     (default: .venv-triton in the repo root)
#
# Why a venv of its own: nvidia-pytriton (which bundles tritonserver 2.51 and its Python backend)
# needs numpy<2 and tritonclient~=2.50; and the Python backend's stub links against the system
# libpython3.11, so the venv must come from Debian's /usr/bin/python3.11 (a pyenv interpreter's
# stdlib does not match that libpython and the model fails to load).
#
# Idempotent: a marker file records what was installed; a rerun with the same requirements
# returns at once. A half-built venv (no marker) is deleted and built again. Concurrent runs
# (pytest workers, CI) serialise on a lock file in $TMPDIR keyed by the venv's path.
# apt-get runs only when something is missing (sudo only when not root).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
VENV="${1:-.venv-triton}"
case "$VENV" in /*) ;; *) VENV="$REPO_ROOT/$VENV" ;; esac
PY="${PIPESERVE_TRITON_BASE_PYTHON:-/usr/bin/python3.11}"

# Everything the venv gets. torch is pinned to the CPU wheel on local disk: an unpinned torch
# (or one resolved through another package) can pull a multi-GB CUDA build.
REQUIREMENTS=(
  "nvidia-pytriton==0.7.0"
  "torch==2.13.0"
  "numpy>=1.26,<2"
  "transformers>=5.0,<6"
  "tokenizers>=0.22,<0.24"
  "safetensors>=0.4"
  "protobuf>=6.30,<7"
  "tritonclient[grpc,http]>=2.50,<3"
)
MARKER="$VENV/.pipeserve-triton-ready"
STAMP="v1 $PY ${REQUIREMENTS[*]}"

log() { printf '[setup_venv %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

T_ALL=$(now)
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/python" ]]; then
  log "ready: $VENV (marker matches; nothing to do)"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
# The lock lives outside the repo (nothing to ignore) and is keyed by the venv's path.
LOCK="${TMPDIR:-/tmp}/pipeserve-triton-venv-$(printf '%s' "$VENV" | md5sum | cut -c1-12).lock"
exec 9>"$LOCK"
if ! flock -n 9; then
  log "another setup holds $LOCK; waiting for it"
  flock 9
fi
# The holder we waited for may have finished the job.
if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$STAMP" && -x "$VENV/bin/python" ]]; then
  log "ready: $VENV (built by a concurrent run)"
  exit 0
fi

# --- system packages, only what is missing ------------------------------------------------
APT_UPDATED=0
apt_install() {
  if ! command -v apt-get >/dev/null 2>&1; then
    log "ERROR: need Debian packages $* but apt-get is not available"
    exit 2
  fi
  local SUDO=()
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n); else
      log "ERROR: need Debian packages $* and am neither root nor have sudo"
      exit 2
    fi
  fi
  local t
  t=$(now)
  if [[ $APT_UPDATED == 0 ]]; then
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  log "apt-get install took $(since "$t")"
}

if [[ ! -x "$PY" ]]; then
  log "$PY is missing; installing Debian's python3.11"
  apt_install python3.11 python3.11-venv libpython3.11
  if [[ ! -x "$PY" ]]; then
    log "ERROR: $PY is still missing after installing python3.11"
    exit 2
  fi
fi
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  log "$PY has no venv/ensurepip; installing python3-venv"
  apt_install python3-venv python3.11-venv
fi
if ! compgen -G '/usr/lib/*/libpython3.11.so.1.0' >/dev/null \
  && ! { command -v ldconfig >/dev/null && ldconfig -p | grep -q 'libpython3\.11\.so\.1\.0'; }; then
  # The Python backend stub of tritonserver links against it.
  log "libpython3.11.so.1.0 is missing; installing libpython3.11"
  apt_install libpython3.11
fi

# --- the venv -----------------------------------------------------------------------------
if [[ -e "$VENV" ]]; then
  # Never delete something that is not a venv (say, a mistyped argument naming the repo).
  if [[ ! -f "$VENV/pyvenv.cfg" && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
    log "ERROR: $VENV exists and is not a virtualenv; refusing to replace it"
    exit 2
  fi
  log "removing incomplete or outdated $VENV"
  rm -rf "$VENV"
fi
t=$(now)
"$PY" -m venv "$VENV"
log "created venv from $PY ($("$PY" -V 2>&1)) in $(since "$t")"

t=$(now)
# --only-binary: no source builds on CI; every package here has a manylinux wheel.
# --no-compile: byte-compiling all of torch and transformers costs ~30 CPU-s; the warm-up
# imports below compile only what serving uses (PYTHONDONTWRITEBYTECODE, set on these machines,
# is lifted for them, and harness.py lifts it for the server too).
# The grep drops pip's noise about this machine's file:// extra indexes lacking a package.
set +e
"$VENV/bin/python" -m pip install --only-binary=:all: --no-compile --progress-bar off -q "${REQUIREMENTS[@]}" 2>&1 \
  | grep -v "is ignored: it is neither a file nor a directory"
rc=${PIPESTATUS[0]}
set -e
if [[ $rc != 0 ]]; then
  log "ERROR: pip install failed (exit $rc)"
  exit "$rc"
fi
log "pip install took $(since "$t")"

# --- sanity checks (CPU torch, numpy<2, a stub for this python) and warm-up imports ---------
t=$(now)
env -u PYTHONDONTWRITEBYTECODE "$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import pathlib
import sys

import numpy
import torch
import transformers
import pytriton
import tritonclient.grpc  # noqa: F401
import tritonclient.http  # noqa: F401
from pytriton.triton import Triton  # noqa: F401
from pytriton.decorators import batch  # noqa: F401
from pytriton.proxy import communication, data, inference  # noqa: F401
# What serve_model.py loads: resolving these lazy classes imports the modelling machinery.
from transformers import (  # noqa: F401
    AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification, BertModel,
)

problems = []
if numpy.__version__.split(".")[0] != "1":
    problems.append(f"numpy {numpy.__version__} (pytriton needs numpy<2)")
if torch.version.cuda is not None or "+cpu" not in torch.__version__:
    problems.append(f"torch {torch.__version__} cuda={torch.version.cuda} is not the CPU wheel")
cuda_pkgs = sorted(
    name for name in (d.metadata["Name"] for d in md.distributions())
    if name.lower().startswith("nvidia-") and name.lower() != "nvidia-pytriton"
)
if cuda_pkgs:
    problems.append(f"CUDA packages got installed: {cuda_pkgs}")
stub = (pathlib.Path(pytriton.__file__).parent / "tritonserver" / "python_backend_stubs"
        / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub")
if not stub.exists():
    problems.append(f"no Python backend stub for this interpreter at {stub}")
if problems:
    sys.exit("setup_venv: " + "; ".join(problems))
print(f"[setup_venv] python {sys.version.split()[0]} torch {torch.__version__} numpy {numpy.__version__} "
      f"transformers {transformers.__version__} nvidia-pytriton {md.version('nvidia-pytriton')} "
      f"tritonclient {md.version('tritonclient')}")
EOF
log "checks took $(since "$t")"

printf '%s' "$STAMP" >"$MARKER"
log "ready: $VENV (total $(since "$T_ALL"))"
