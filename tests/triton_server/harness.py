"""Run a real Triton Inference Server for pipeserve's tests.

Imported by tests in pipeserve's MAIN venv: standard library plus ``tritonclient`` (for the
readiness check) only. The server itself runs in a separate venv (``.venv-triton``, made by
``setup_venv.sh`` from Debian's python3.11, with nvidia-pytriton, numpy<2 and a CPU torch), where
``serve_model.py`` loads a saved Hugging Face model and serves it through PyTriton.

    from tests.triton_server.harness import TritonProcess, require_triton

    require_triton()    # pytest.skip if the machine cannot run Triton at all (triton_available),
                        # else build .venv-triton once (ensure_venv: 1-3 min), instant afterwards
    with TritonProcess(model_dir, "tiny-bert") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
        ...
        triton.stop()                  # graceful (SIGTERM); kill() simulates a crash
        triton.restart()               # same ports: a client holding grpc_url sees it come back

Why the folder is not called ``tests/triton``: a folder named ``triton`` on sys.path (tests/ is, for
a script run from it or under pytest's prepend import mode without tests/__init__.py) is found by
``import triton`` as a namespace package where OpenAI Triton is not installed (CPU torch); torch
then believes Triton is there, ``torch._dynamo`` fails to import, and with it every transformers
model class ("Could not import module 'BertForSequenceClassification'").

Environment:
  PIPESERVE_TRITON_VENV   venv to use (default: <repo>/.venv-triton)
  PIPESERVE_SKIP_TRITON=1 opt out on a developer machine (ignored when CI is set)
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SETUP_SCRIPT = HERE / "setup_venv.sh"
SERVE_SCRIPT = HERE / "serve_model.py"
MARKER_NAME = ".pipeserve-triton-ready"
BASE_PYTHON = Path(os.environ.get("PIPESERVE_TRITON_BASE_PYTHON", "/usr/bin/python3.11"))

KINDS = ("sequence-classification", "token-logits", "hidden-states")

__all__ = [
    "TritonProcess",
    "TritonStartError",
    "default_venv",
    "ensure_venv",
    "require_triton",
    "triton_available",
    "triton_python",
    "venv_ready",
]


class TritonStartError(RuntimeError):
    """Triton did not come up (or the venv could not be built); the message ends with the log tail."""


# --------------------------------------------------------------------------------------------
# The venv
# --------------------------------------------------------------------------------------------


def default_venv() -> Path:
    env = os.environ.get("PIPESERVE_TRITON_VENV")
    return Path(env).resolve() if env else REPO_ROOT / ".venv-triton"


def triton_python(venv: str | os.PathLike | None = None) -> Path:
    return Path(venv or default_venv()) / "bin" / "python"


def venv_ready(venv: str | os.PathLike | None = None) -> bool:
    """True when setup_venv.sh finished in ``venv`` (its marker exists).

    The marker also records the requirements; ``ensure_venv`` reruns the script, which rebuilds
    when they changed. This check is only the cheap "was it ever built".
    """
    venv = Path(venv or default_venv())
    return (venv / MARKER_NAME).is_file() and (venv / "bin" / "python").exists()


def _debian_major() -> str | None:
    try:
        return Path("/etc/debian_version").read_text().strip().split(".")[0]
    except OSError:
        return None


def triton_available(venv: str | os.PathLike | None = None) -> tuple[bool, str]:
    """Can this machine run the real Triton tests? Returns (ok, reason); cheap, builds nothing.

    False only where it truly cannot: not Linux x86_64 (the bundled tritonserver is a
    manylinux x86_64 binary), or no Debian python3.11 and no way to install it (a Debian 12 with
    apt-get as root or through sudo gets it from setup_venv.sh). A developer may opt out with
    PIPESERVE_SKIP_TRITON=1; under CI that is ignored, so CI always runs these tests. When this
    says True and the build or the start then fails, that is a test failure, not a skip.
    """
    venv = Path(venv or default_venv())
    if os.environ.get("PIPESERVE_SKIP_TRITON") == "1" and not os.environ.get("CI"):
        return False, "PIPESERVE_SKIP_TRITON=1 is set (ignored under CI)"
    if venv_ready(venv):
        return True, f"Triton venv ready at {venv}"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"tritonserver from nvidia-pytriton needs Linux x86_64, this is {sys.platform}/{platform.machine()}"
    if not SETUP_SCRIPT.is_file():
        return False, f"{SETUP_SCRIPT} is missing"
    if shutil.which("bash") is None or shutil.which("flock") is None:
        return False, "setup_venv.sh needs bash and flock (util-linux)"
    if BASE_PYTHON.exists():
        return True, f"{venv} will be built from {BASE_PYTHON}"
    can_apt = shutil.which("apt-get") is not None and (os.geteuid() == 0 or shutil.which("sudo") is not None)
    if can_apt and _debian_major() == "12":
        return True, f"{venv} will be built after apt-get installs python3.11"
    return False, (
        f"{BASE_PYTHON} (Debian's python3.11, whose libpython the Triton Python backend stub links "
        f"against) is missing and cannot be installed here (Debian 12 with apt-get as root needed)"
    )


def require_triton(venv: str | os.PathLike | None = None) -> Path:
    """For a pytest fixture: skip when ``triton_available`` says the machine cannot, else build
    the venv (``ensure_venv``) and return its path. A failing build fails the test."""
    ok, reason = triton_available(venv)
    if not ok:
        import pytest

        pytest.skip(reason)
    return ensure_venv(venv)


_venv_lock = threading.Lock()


def ensure_venv(venv: str | os.PathLike | None = None, timeout: float = 1200.0) -> Path:
    """Build the Triton venv if needed (runs setup_venv.sh; instant when already built).

    Raises TritonStartError with the script's output tail when it fails.
    """
    venv = Path(venv or default_venv())
    with _venv_lock:
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT), str(venv)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not venv_ready(venv):
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            raise TritonStartError(
                f"setup_venv.sh {venv} failed (exit {proc.returncode}) after "
                f"{time.monotonic() - t0:.0f}s; output tail:\n{tail}"
            )
        return venv


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


# Lines tritonserver logs when it gives up starting (main.cc).
_TRITON_FATAL_MARKS = ("failed to start", "error: creating server", "Address already in use")


def _free_port(host: str = "127.0.0.1", avoid: set[int] = frozenset()) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
    raise RuntimeError("could not find a free port")


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_TRITON_MODEL_FOLDER = re.compile(r"^/tmp/folder[A-Za-z0-9]{6}(?=/)")


def _group_leftovers(pgid: int) -> tuple[set[str], set[str]]:
    """What a SIGKILL of group ``pgid`` would leave behind (found through Linux /proc).

    Returns (shm files, folders): the /dev/shm files its processes have mapped or open (the
    Python backend's ``pytrtion<pid>-...`` regions, PyTriton's ``psm_...`` tensor store,
    semaphores) and the ``/tmp/folderXXXXXX`` copies of the model that tritonserver made for
    its Python backend stubs (named in their command lines). A clean stop removes them all.
    """
    found: set[str] = set()
    folders: set[str] = set()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            # pgrp is the 3rd field after the parenthesised command name.
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                for arg in f.read().decode(errors="replace").split("\0"):
                    match = _TRITON_MODEL_FOLDER.match(arg)
                    if match:
                        folders.add(match.group(0))
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    idx = line.find("/dev/shm/")
                    if idx != -1:
                        found.add(line[idx:].strip().removesuffix(" (deleted)"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("/dev/shm/"):
                    found.add(target.removesuffix(" (deleted)"))
        except (OSError, ValueError, IndexError):
            continue
    return found, folders


class TritonProcess:
    """One tritonserver (through serve_model.py in the Triton venv) serving one saved HF model.

    Args:
        model_dir: a directory written by ``save_pretrained``.
        model_name: the name the model has in Triton.
        kind: "sequence-classification" (output ``logits`` [-1]), "token-logits" (``logits``
            [-1, -1]) or "hidden-states" (``last_hidden_state`` [-1, -1]).
        outputs: Triton output tensor names, each ``NAME`` or ``NAME=ATTR`` (ATTR: the HF model
            output's attribute); default by kind.
        extra_args: more serve_model.py arguments, e.g. ``["--max-queue-delay-us", "2000"]``,
            ``["--delay-ms", "50"]``, ``["--input", "token_type_ids"]``,
            ``["--auto-class", "AutoModelForMaskedLM"]``, ``["--max-batch-size", "8"]``.
        venv: the Triton venv (default ``default_venv()``); must have been built (``ensure_venv``).
        start_timeout: seconds ``start()`` waits for the model to be ready.
        host: address the endpoints bind to and the URLs use.

    Ports are picked free on the first ``start()`` and kept for the object's life, so
    ``restart()`` (or ``stop()`` then ``start()``) comes back on the same ``grpc_url``.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        model_name: str,
        kind: str = "sequence-classification",
        *,
        outputs: list[str] | None = None,
        extra_args: list[str] | tuple[str, ...] = (),
        venv: str | os.PathLike | None = None,
        start_timeout: float = 180.0,
        host: str = "127.0.0.1",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        # Absolute: the server runs with its own temp dir as cwd.
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} has no config.json (expected a save_pretrained directory)")
        self.model_name = model_name
        self.kind = kind
        self.outputs = list(outputs or [])
        self.extra_args = list(extra_args)
        self.venv = Path(venv or default_venv())
        self.start_timeout = start_timeout
        self.host = host
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.metrics_port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self._tmp = Path(tempfile.mkdtemp(prefix="pipeserve-triton-"))
        self.log_path = self._tmp / "triton.log"
        self._starts = 0
        self.last_start_seconds: float | None = None

    # -- URLs ---------------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        self._need_ports()
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        self._need_ports()
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        self._need_ports()
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _need_ports(self) -> None:
        if self.grpc_port is None:
            raise RuntimeError("ports are picked by start(); call it first")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> "TritonProcess":
        """Spawn serve_model.py and wait until Triton says the model is ready.

        Raises TritonStartError (with the log tail) if the process exits or the model is not
        ready within ``start_timeout``.
        """
        if self.is_running():
            raise RuntimeError(f"Triton already running (pid {self.pid})")
        if not venv_ready(self.venv):
            raise TritonStartError(f"Triton venv {self.venv} is not built; call harness.ensure_venv() first")
        if self.grpc_port is not None:
            self._wait_ports_free()
            self._spawn_and_wait()
            return self
        # Fresh ports: picked free, then released for tritonserver to bind, so another process
        # may take one in between. A start that loses that race is retried on new ports.
        for attempt in range(3):
            used: set[int] = set()
            for attr in ("grpc_port", "http_port", "metrics_port"):
                port = _free_port(self.host, used)
                used.add(port)
                setattr(self, attr, port)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._spawn_and_wait()
                return self
            except TritonStartError:
                lost_race = "address already in use" in self._log_since(log_offset).lower()
                if attempt == 2 or not lost_race:
                    self.grpc_port = self.http_port = self.metrics_port = None
                    raise
        raise AssertionError("unreachable")

    def _wait_ports_free(self, timeout: float = 15.0) -> None:
        # Same ports as before; the previous server's sockets may take a moment to go.
        deadline = time.monotonic() + timeout
        while not all(_port_free(p, self.host) for p in (self.grpc_port, self.http_port, self.metrics_port)):
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"ports {self.grpc_port}/{self.http_port}/{self.metrics_port} still busy after "
                    f"{timeout:.0f}s; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _spawn_and_wait(self) -> None:
        self._starts += 1
        workspace = self._tmp / f"workspace-{self._starts}"
        tmpdir = self._tmp / "tmp"
        tmpdir.mkdir(exist_ok=True)
        cmd = [
            str(triton_python(self.venv)),
            str(SERVE_SCRIPT),
            "--model-dir", str(self.model_dir),
            "--model-name", self.model_name,
            "--kind", self.kind,
            "--address", self.host,
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            "--workspace", str(workspace),
        ]
        for out in self.outputs:
            cmd += ["--output", out]
        cmd += self.extra_args

        env = dict(os.environ)
        # The main venv's settings must not leak into the Triton venv's interpreter.
        # PYTHONDONTWRITEBYTECODE goes too: the venv is installed without .pyc files, and the
        # first start writes them for what it imports (later starts are then seconds faster).
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONDONTWRITEBYTECODE"):
            env.pop(var, None)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTRITON_HOME": str(self._tmp / "pytriton-home"),
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
                # Python's and torch's temp files go in here, so close() removes them. (Not
                # tritonserver's /tmp/folderXXXXXX model copies: it ignores TMPDIR; _terminate
                # removes those after a SIGKILL.)
                "TMPDIR": str(tmpdir),
            }
        )
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== start #{self._starts}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
        log_offset = self._log_file.tell()
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self._tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: tritonserver and the stubs are in it
        )
        try:
            self._wait_ready(t0, log_offset)
        except BaseException:
            self._terminate(timeout=10)
            raise
        self.last_start_seconds = time.monotonic() - t0

    def _wait_ready(self, t0: float, log_offset: int) -> None:
        import tritonclient.grpc as grpcclient  # main venv dependency; imported lazily

        deadline = t0 + self.start_timeout
        last_error = "not polled yet"
        client = None
        try:
            while True:
                if self._proc.poll() is not None:
                    raise TritonStartError(
                        f"serve_model.py exited with {self._proc.returncode} before the model was ready; "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                # tritonserver exiting at start-up (a port taken, a bad option) leaves PyTriton
                # polling it for 120s; its log says so at once.
                fatal = [
                    line for line in self._log_since(log_offset).splitlines()
                    if any(mark in line for mark in _TRITON_FATAL_MARKS)
                ]
                if fatal:
                    raise TritonStartError(
                        f"tritonserver failed to start: {fatal[0].strip()[:300]}; "
                        f"log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TritonStartError(
                        f"model {self.model_name!r} not ready on {self.grpc_url} after {self.start_timeout:.0f}s "
                        f"(last check: {last_error}); log tail ({self.log_path}):\n{self.log_tail()}"
                    )
                try:
                    if client is None:
                        client = grpcclient.InferenceServerClient(self.grpc_url)
                    if client.is_server_live() and client.is_model_ready(self.model_name):
                        return
                    last_error = "server up, model not ready"
                except Exception as e:  # connection refused while it starts
                    last_error = f"{type(e).__name__}: {e}".splitlines()[0][:200]
                time.sleep(0.25)
        finally:
            if client is not None:
                client.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop: SIGTERM to serve_model.py (which stops tritonserver), then SIGKILL to the
        whole process group if it has not exited within ``timeout``. Idempotent."""
        self._terminate(timeout)

    def kill(self) -> None:
        """Crash it: SIGKILL the whole process group at once (serve_model, tritonserver, stubs)."""
        self._terminate(timeout=0)

    def restart(self, timeout: float = 30.0) -> "TritonProcess":
        """Stop, then start again on the same ports."""
        self.stop(timeout)
        return self.start()

    def _terminate(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the leader's pid
        shm_files: set[str] = set()
        folders: set[str] = set()
        try:
            if proc.poll() is None and timeout > 0:
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # Whatever is left of the group (all of it on kill(), stragglers after a stop). Note
            # the shared memory it has open first: a process killed this way cannot remove it.
            shm_files, folders = _group_leftovers(pgid)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self._wait_group_gone(pgid, 10)
        finally:
            for path in shm_files:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
            self._proc = None
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Stop and remove the temp dir (logs included)."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "TritonProcess":
        if not self.is_running():
            try:
                self.start()
            except BaseException:
                self.close()  # __exit__ will not run; the error message carries the log tail
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a tritonserver (or its files) behind
        try:
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
            shutil.rmtree(self._tmp, ignore_errors=True)
        except Exception:
            pass

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        port = self.grpc_port if self.grpc_port is not None else "-"
        return f"TritonProcess({self.model_name!r}, grpc {self.host}:{port}, {state})"
