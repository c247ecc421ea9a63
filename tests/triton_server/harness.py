"""Run a real Triton Inference Server for pipeserve's tests.

Imported by tests in pipeserve's MAIN venv: standard library plus ``tritonclient`` (for the
readiness check) only. The server itself runs in a separate venv (``.venv-triton``, made by
``setup_venv.sh`` from Debian's python3.11, with nvidia-pytriton, numpy<2 and a CPU torch), where
``serve_model.py`` loads a saved Hugging Face model and serves it through PyTriton.

    from triton_server.harness import TritonProcess, triton_available, ensure_venv  # tests/ on sys.path

    ok, reason = triton_available()
    if not ok:
        pytest.skip(reason)
    ensure_venv()                      # builds .venv-triton once (about a minute), then instant
    with TritonProcess(model_dir, "tiny-bert") as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_url)
        ...
        triton.stop()                  # graceful (SIGTERM); kill() simulates a crash
        triton.restart()               # same ports: a client holding grpc_url sees it come back

Environment:
  PIPESERVE_TRITON_VENV   venv to use (default: <repo>/.venv-triton)
  PIPESERVE_SKIP_TRITON=1 opt out on a developer machine (ignored when CI is set)
"""

from __future__ import annotations

import os
import platform
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
        self.model_dir = Path(model_dir)
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
        python = triton_python(self.venv)
        if not venv_ready(self.venv):
            raise TritonStartError(f"Triton venv {self.venv} is not built; call harness.ensure_venv() first")
        if self.grpc_port is None:
            used: set[int] = set()
            for attr in ("grpc_port", "http_port", "metrics_port"):
                port = _free_port(self.host, used)
                used.add(port)
                setattr(self, attr, port)
        else:
            # Same ports as before; the previous server's sockets may take a moment to go.
            deadline = time.monotonic() + 15
            while not all(_port_free(p, self.host) for p in (self.grpc_port, self.http_port, self.metrics_port)):
                if time.monotonic() > deadline:
                    raise TritonStartError(
                        f"ports {self.grpc_port}/{self.http_port}/{self.metrics_port} still busy; "
                        f"log tail:\n{self.log_tail()}"
                    )
                time.sleep(0.1)

        self._starts += 1
        workspace = self._tmp / f"workspace-{self._starts}"
        cmd = [
            str(python),
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
        for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(var, None)
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTRITON_HOME": str(self._tmp / "pytriton-home"),
                "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false",
            }
        )
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"\n===== start #{self._starts}: {' '.join(cmd)}\n".encode())
        self._log_file.flush()
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
            self._wait_ready(t0)
        except BaseException:
            self._terminate(timeout=10)
            raise
        self.last_start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
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
            # Whatever is left of the group (all of it on kill(), stragglers after a stop).
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
            self._cleanup_shm(proc.pid)
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

    @staticmethod
    def _cleanup_shm(pid: int) -> None:
        # The Python backend's shared-memory regions are named after serve_model's pid; a clean
        # stop removes them, a SIGKILL leaves them in /dev/shm.
        shm = Path("/dev/shm")
        for path in shm.glob(f"pytrtion{pid}-*"):
            try:
                path.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Stop and remove the temp dir (logs included)."""
        self.stop()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "TritonProcess":
        if not self.is_running():
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a tritonserver behind
        try:
            if self._proc is not None and self._proc.poll() is None:
                os.killpg(self._proc.pid, signal.SIGKILL)
        except Exception:
            pass

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        port = self.grpc_port if self.grpc_port is not None else "-"
        return f"TritonProcess({self.model_name!r}, grpc {self.host}:{port}, {state})"
