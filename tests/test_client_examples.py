"""clients/examples/: every grpcurl command's request reaches the live server and is answered,
and the shell examples run as they are written."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory

from tests.conftest import ROOT

EXAMPLES = ROOT / "clients" / "examples"
PROTOS = ROOT / "protos" / "pipeserve" / "v1"


def grpcurl_commands() -> list[list[str]]:
    commands = []
    for line in (EXAMPLES / "grpcurl.sh").read_text().splitlines():
        if line.startswith("grpcurl "):
            commands.append(shlex.split(line))
    return commands


def _load_descriptors() -> None:
    """Every pipeserve.v1 module, health and KServe v2, in the default descriptor pool."""
    for proto in PROTOS.glob("*.proto"):
        importlib.import_module(f"pipeserve.v1.{proto.stem}_pb2")
    importlib.import_module("grpc_health.v1.health_pb2")
    importlib.import_module("tritonclient.grpc.service_pb2")


def served_services(channel: grpc.Channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    return {s.name for s in reply.list_services_response.service}


def test_every_grpcurl_request_is_answered(target):
    """What grpcurl would do with each command: its -d JSON parsed into the method's request type
    (unknown fields fail), sent to the method, answered OK. list/describe: the services exist."""
    _load_descriptors()
    pool = descriptor_pool.Default()
    commands = grpcurl_commands()
    assert len(commands) >= 8
    sent = 0
    with grpc.insecure_channel(target) as channel:
        served = served_services(channel)
        for command in commands:
            assert command[1] == "-plaintext" and "localhost:8001" in command, command
            if "-d" not in command:  # grpcurl ... localhost:8001 list | describe SERVICE
                verb, *names = command[command.index("localhost:8001") + 1:]
                assert verb in ("list", "describe"), command
                assert all(name in served for name in names), names
                continue
            body = command[command.index("-d") + 1]
            path = command[-1]
            service_name, method_name = path.rsplit("/", 1)
            method = pool.FindServiceByName(service_name).methods_by_name[method_name]  # KeyError: a typo
            if service_name not in served:
                continue  # a task not served by this server's repository yet
            request = json_format.Parse(body, message_factory.GetMessageClass(method.input_type)())
            response_class = message_factory.GetMessageClass(method.output_type)
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = kind(f"/{path}", request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=response_class.FromString)
            reply = call(request, timeout=60)
            replies = list(reply) if method.server_streaming else [reply]
            assert replies, path
            sent += 1
    assert sent >= 6


def test_shell_examples_run_against_the_server(target):
    env = {**os.environ, "PIPESERVE_TARGET": target, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(EXAMPLES / "shell.sh")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "SERVING"
    assert {"label", "score"} == set(json.loads(lines[1])[0])
    assert lines[-1] == "no-such-model: refused, as it should be"
