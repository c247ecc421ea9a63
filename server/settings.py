"""Server settings: every flag of `pipeserve serve` also comes from a PIPESERVE_* environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


@dataclass
class ServerSettings:
    model_repository: Path = Path("model_repository")
    host: str = "0.0.0.0"
    # TCP port for gRPC (8001, as Triton); 0 picks a free port; -1 disables TCP.
    port: int = 8001
    # TCP port for HTTP (8000, as Triton): KServe v2 REST, the pipelines, the OpenAI API; 0 picks
    # a free port; -1 disables HTTP. Same host, TLS, token and size limit as the gRPC port.
    http_port: int = 8000
    # Also (or only, with port -1) listen on this unix domain socket path. Always plaintext:
    # the file's permissions guard it (a sidecar's shared volume), the bearer token still applies.
    unix_socket: str = ""
    # Octal permissions for the socket file (e.g. "0660" lets a sidecar's app container in the
    # same group connect); empty: as created under the process umask.
    unix_socket_mode: str = ""
    # A plaintext port that serves only grpc.health.v1, for kubelet gRPC probes (which speak
    # neither TLS nor tokens) when the main port needs TLS, or when traffic uses only the unix
    # socket; -1: off. Health is always on the main port(s) as well.
    health_port: int = -1
    # Prometheus metrics over HTTP (8002, as Triton); -1 disables.
    metrics_port: int = 8002
    metrics_host: str = "0.0.0.0"
    # Seconds that in-flight calls get to finish after SIGTERM.
    grace_period: float = 30.0
    max_receive_message_bytes: int = 64 * 1024 * 1024
    max_send_message_bytes: int = 64 * 1024 * 1024
    # Models to load at start; empty: every model of the repository.
    load_models: list[str] = field(default_factory=list)
    # "none": load at start only; "explicit": also load/unload through the API; "poll": also
    # follow repository changes every repository_poll_seconds.
    model_control_mode: str = "explicit"
    repository_poll_seconds: float = 15.0
    tls_cert: str = ""
    tls_key: str = ""
    # With a client CA, clients must present a certificate it signed (mTLS).
    tls_client_ca: str = ""
    # A bearer token every call must carry in `authorization: Bearer <token>`; empty: off.
    auth_token: str = ""
    log_level: str = "info"
    log_format: str = "text"

    @classmethod
    def env_name(cls, name: str) -> str:
        return "PIPESERVE_" + name.upper()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> ServerSettings:
        """Defaults overridden by PIPESERVE_<FIELD> variables (e.g. PIPESERVE_PORT=9001)."""
        environ = os.environ if environ is None else environ
        settings = cls()
        for f in fields(cls):
            raw = environ.get(cls.env_name(f.name))
            if raw is None:
                continue
            setattr(settings, f.name, parse_setting(f.name, getattr(settings, f.name), raw))
        return settings


def parse_setting(name: str, current: object, raw: str) -> object:
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, Path):
        return Path(raw)
    if isinstance(current, list):
        return [x for x in raw.replace(",", " ").split() if x]
    return raw
