"""Server options for sidecars: TLS, mTLS, the bearer token, the unix socket, the health-only port,
and every setting from PIPESERVE_* environment variables.

A CA, a server certificate and a client certificate are made here; one server runs with all the
options at once (mTLS + token on TCP, plaintext unix socket, plaintext health port).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pipeserve.client import pipeline
from pipeserve.server.security import BearerTokenInterceptor, server_credentials
from pipeserve.server.settings import ServerSettings
from tests.conftest import server_settings
from tests.server_harness import ServerProcess, ServerThread, wait_serving
from tests.test_node_client import run_node_tests

TOKEN = "s3cret-token"
PLAIN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


# ---------------------------------------------------------------- certificates made for the test

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_key, issuer: x509.Name | None, *, ca: bool = False, server: bool = False):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, cert, key) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("pki")
    paths: dict[str, str] = {}
    for prefix in ("", "other_"):  # a second, unrelated CA: its certificates must be refused
        ca_key = _key()
        ca = _cert(f"{prefix}pipeserve test CA", ca_key, ca_key, None, ca=True)
        paths[f"{prefix}ca"], _ = _write(folder, f"{prefix}ca", ca, ca_key)
        server_key, client_key = _key(), _key()
        paths[f"{prefix}server_cert"], paths[f"{prefix}server_key"] = _write(
            folder, f"{prefix}server", _cert("localhost", server_key, ca_key, ca.subject, server=True), server_key)
        paths[f"{prefix}client_cert"], paths[f"{prefix}client_key"] = _write(
            folder, f"{prefix}client", _cert("app", client_key, ca_key, ca.subject), client_key)
    return paths


@pytest.fixture(scope="module")
def secure_server(model_repository: Path, pki: dict[str, str], tmp_path_factory):
    socket_path = tmp_path_factory.mktemp("run") / "sock" / "pipeserve.sock"  # the parent is made by the server
    settings = server_settings(
        model_repository, load_models=["sentiment"], tls_cert=pki["server_cert"], tls_key=pki["server_key"],
        tls_client_ca=pki["ca"], auth_token=TOKEN, unix_socket=str(socket_path), unix_socket_mode="0660",
        health_port=0)
    running = ServerThread(settings).start()
    yield running
    running.stop()


def mtls(pki: dict[str, str], target: str, **kwargs):
    return pipeline("sentiment-analysis", target=target, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                    tls_key=pki["client_key"], retries=0, timeout=10, **kwargs)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code()


# ---------------------------------------------------------------- TLS and mTLS

def test_mtls_with_the_token_is_answered(secure_server, pki):
    with mtls(pki, secure_server.target, token=TOKEN) as clf:
        [result] = clf("I love this")
    assert set(result) == {"label", "score"}


def test_mtls_refuses_a_client_without_a_certificate(secure_server, pki):
    with pipeline("sentiment-analysis", target=secure_server.target, tls_ca=pki["ca"], token=TOKEN, retries=0,
                  timeout=10) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(secure_server, pki):
    with pipeline("sentiment-analysis", target=secure_server.target, tls_ca=pki["ca"], tls_cert=pki["other_client_cert"],
                  tls_key=pki["other_client_key"], token=TOKEN, retries=0, timeout=10) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_its_ca_did_not_sign(secure_server, pki):
    with pipeline("sentiment-analysis", target=secure_server.target, tls_ca=pki["other_ca"],
                  tls_cert=pki["client_cert"], tls_key=pki["client_key"], token=TOKEN, retries=0, timeout=10) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_cannot_talk_to_the_tls_port(secure_server):
    with pipeline("sentiment-analysis", target=secure_server.target, token=TOKEN, retries=0, timeout=10) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNAVAILABLE


def test_tls_server_name_override_reaches_a_server_by_another_name(secure_server, pki):
    # The certificate names localhost and 127.0.0.1; "localhost" as the expected name works
    # whatever address the target spells.
    with mtls(pki, f"localhost:{secure_server.server.port}", token=TOKEN, tls_server_name="localhost") as clf:
        assert clf("ok")[0]["label"]


def test_tls_settings_must_come_in_pairs(tmp_path):
    for partial in ({"tls_cert": "a.crt"}, {"tls_key": "a.key"}, {"tls_client_ca": "ca.crt"}):
        with pytest.raises(ValueError, match="TLS needs both"):
            server_credentials(ServerSettings(**partial))
    with pytest.raises(ValueError, match="--tls-(cert|key): cannot read"):
        server_credentials(ServerSettings(tls_cert=str(tmp_path / "missing.crt"), tls_key=str(tmp_path / "k")))


# ---------------------------------------------------------------- the bearer token

@pytest.mark.parametrize("metadata", [
    None,
    [("authorization", "Bearer wrong")],
    [("authorization", f"Basic {TOKEN}")],
    [("authorization", TOKEN)],
    [("authorization", f"Bearer {TOKEN}x")],
])
def test_wrong_or_missing_token_is_unauthenticated(secure_server, pki, metadata):
    with mtls(pki, secure_server.target, metadata=dict(metadata or [])) as clf:
        with pytest.raises(grpc.RpcError) as caught:
            clf("x")
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in caught.value.details()


def test_token_scheme_is_case_insensitive(secure_server, pki):
    with mtls(pki, secure_server.target, metadata={"authorization": f"bearer {TOKEN}"}) as clf:
        assert clf("x")[0]["label"]


def _secure_channel(pki, target):
    creds = grpc.ssl_channel_credentials(Path(pki["ca"]).read_bytes(), Path(pki["client_key"]).read_bytes(),
                                         Path(pki["client_cert"]).read_bytes())
    return grpc.secure_channel(target, creds)


@pytest.mark.parametrize("service", ["", "readiness", "liveness"])
def test_health_stays_open_without_the_token(secure_server, pki, service):
    with _secure_channel(pki, secure_server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _list_services(channel: grpc.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    [reply] = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    return [s.name for s in reply.list_services_response.service]


def _rpc_shapes(service_names: list[str]) -> list[tuple[str, bool, bool]]:
    """(method path, client streaming, server streaming) of every RPC of the named services."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    found = []
    for name in service_names:
        if name in PLAIN_SERVICES:
            continue
        service = pool.FindServiceByName(name)
        for method in service.methods:
            found.append((f"/{name}/{method.name}", method.client_streaming, method.server_streaming))
    return found


def test_every_rpc_of_every_service_refuses_a_missing_token_in_its_own_shape(secure_server, pki):
    """Unary, server-streaming, client-streaming and bidi RPCs (KServe's ModelStreamInfer) alike.

    The streaming requests never send a message: a refusal of the wrong shape would wait for one
    until the deadline instead of answering UNAUTHENTICATED at once."""
    never = threading.Event()

    def silent_requests():
        never.wait(10)
        return
        yield  # pragma: no cover

    with _secure_channel(pki, secure_server.target) as channel:
        shapes = _rpc_shapes(_list_services(channel))
        assert any(path.startswith("/pipeserve.v1.TextClassificationService/") for path, _, _ in shapes)
        for path, client_streaming, server_streaming in shapes:
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                (client_streaming, server_streaming)]
            call = kind(path, request_serializer=None, response_deserializer=None)
            request = silent_requests() if client_streaming else b""
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                reply = call(request, timeout=8)
                if server_streaming:
                    list(reply)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, path
            assert time.monotonic() - started < 5, f"{path} waited for a request before refusing"
    never.set()


async def test_bearer_interceptor_refuses_each_rpc_shape_at_once():
    """The interceptor on a server with one RPC of each shape (pipeserve may not expose all four)."""
    async def unary(request, context):
        return request

    async def server_stream(request, context):
        yield request

    async def client_stream(requests, context):
        return b"".join([r async for r in requests])

    async def bidi(requests, context):
        async for r in requests:
            yield r

    handler = grpc.method_handlers_generic_handler("test.Shapes", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    })
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor(TOKEN)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            good = [("authorization", f"Bearer {TOKEN}")]

            async def silent():
                await asyncio.sleep(10)
                yield b""  # pragma: no cover

            async def one():
                yield b"hi"

            calls = {
                "Unary": lambda md: channel.unary_unary("/test.Shapes/Unary")(b"hi", metadata=md, timeout=8),
                "ServerStream": lambda md: _collect(channel.unary_stream("/test.Shapes/ServerStream")(
                    b"hi", metadata=md, timeout=8)),
                "ClientStream": lambda md: channel.stream_unary("/test.Shapes/ClientStream")(
                    (one() if md else silent()), metadata=md, timeout=8),
                "Bidi": lambda md: _collect(channel.stream_stream("/test.Shapes/Bidi")(
                    (one() if md else silent()), metadata=md, timeout=8)),
            }
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as caught:
                    await call(None)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert time.monotonic() - started < 5, name
                reply = await call(good)
                assert reply in (b"hi", [b"hi"]), name
    finally:
        await server.stop(0)


async def _collect(call) -> list:
    return [message async for message in call]


# ---------------------------------------------------------------- unix socket and health port

def test_unix_socket_is_plaintext_with_the_token(secure_server):
    target = f"unix:{secure_server.settings.unix_socket}"
    with pipeline("sentiment-analysis", target=target, token=TOKEN, retries=0, timeout=10) as clf:
        assert clf("I love this")[0]["label"]
    with pipeline("sentiment-analysis", target=target, retries=0, timeout=10) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNAUTHENTICATED


def test_unix_socket_mode_lets_the_group_connect(secure_server):
    mode = os.stat(secure_server.settings.unix_socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_health_port_serves_health_alone_in_plaintext(secure_server):
    target = f"127.0.0.1:{secure_server.server.health_port}"
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "readiness", "liveness"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    with pipeline("sentiment-analysis", target=target, token=TOKEN, retries=0, timeout=5) as clf:
        assert code_of(lambda: clf("x")) == grpc.StatusCode.UNIMPLEMENTED


def test_node_client_speaks_mtls_token_and_unix_socket(secure_server, pki):
    run_node_tests({
        "PIPESERVE_TEST_SECURE_TARGET": f"localhost:{secure_server.server.port}",
        "PIPESERVE_TEST_SECURE_TLS_CA": pki["ca"],
        "PIPESERVE_TEST_SECURE_TLS_CERT": pki["client_cert"],
        "PIPESERVE_TEST_SECURE_TLS_KEY": pki["client_key"],
        "PIPESERVE_TEST_SECURE_TOKEN": TOKEN,
        "PIPESERVE_TEST_SECURE_UNIX_TARGET": f"unix:{secure_server.settings.unix_socket}",
    }, pattern="secure")


# ---------------------------------------------------------------- settings from the environment

SAMPLES = {bool: "true", int: "4242", float: "2.5", str: "abc", list: "a,b c"}


def _sample_env(environ: dict[str, str]) -> dict[str, object]:
    """A PIPESERVE_* value for every setting, and the value it must parse to."""
    from pipeserve.server.settings import parse_setting

    expected = {}
    defaults = ServerSettings()
    for f in fields(ServerSettings):
        current = getattr(defaults, f.name)
        raw = SAMPLES.get(type(current), "/some/path")
        environ[ServerSettings.env_name(f.name)] = raw
        expected[f.name] = parse_setting(f.name, current, raw)
    return expected


def test_every_setting_comes_from_its_environment_variable():
    environ: dict[str, str] = {}
    expected = _sample_env(environ)
    settings = ServerSettings.from_env(environ)
    for name, value in expected.items():
        assert getattr(settings, name) == value, name
        assert getattr(settings, name) != getattr(ServerSettings(), name), f"{name}: sample equals the default"


def test_serve_flags_default_to_the_environment(monkeypatch):
    from pipeserve.server.cli import build_parser

    environ: dict[str, str] = {}
    expected = _sample_env(environ)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    # A flag still wins over its variable.
    assert build_parser().parse_args(["serve", "--port", "7"]).port == 7


def test_sidecar_configured_from_the_environment_alone(model_repository, tmp_path):
    """`pipeserve serve` with PIPESERVE_* variables: unix socket, token, health port; then the
    `pipeserve call` CLI through the socket, and SIGTERM removes the socket and exits 0."""
    from tests.server_harness import free_port

    socket_path = tmp_path / "pipeserve.sock"
    health_port = free_port()
    env = {"PIPESERVE_UNIX_SOCKET": str(socket_path), "PIPESERVE_UNIX_SOCKET_MODE": "0660",
           "PIPESERVE_AUTH_TOKEN": TOKEN, "PIPESERVE_HEALTH_PORT": str(health_port),
           "PIPESERVE_LOAD_MODELS": "sentiment", "PIPESERVE_GRACE_PERIOD": "3"}
    server = ServerProcess(model_repository, env=env).start()
    try:
        wait_serving(f"127.0.0.1:{health_port}", 30, server, service="readiness")
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o660
        cli = [sys.executable, "-m", "pipeserve.server.cli", "call", "sentiment-analysis", "I love this"]
        client_env = {**os.environ, "PIPESERVE_TARGET": f"unix:{socket_path}"}
        done = subprocess.run(cli, env={**client_env, "PIPESERVE_TOKEN": TOKEN}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert set(json.loads(done.stdout)[0]) == {"label", "score"}
        refused = subprocess.run([*cli, "--retries", "0"], env=client_env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert refused.stderr.startswith("error: UNAUTHENTICATED")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert not socket_path.exists()
    finally:
        server.stop()
