"""`pipeserve call`, `pipeserve generate` and `pipeserve health`: the server from a shell.

    pipeserve call sentiment-analysis "I love this"
    pipeserve call feature-extraction "hello" --param pooling=mean --target unix:/run/pipeserve/sock
    pipeserve generate --stream "Once upon a time" --param max_new_tokens=20
    pipeserve health --service readiness      # exit 0 when SERVING (a container HEALTHCHECK)

Results print as JSON on stdout; a failed call prints `error: <STATUS>: <message>` on stderr and
exits 1. `server/cli.py` adds these subcommands beside `serve` and `models`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import grpc

from pipeserve.client.channel import TARGET_ENV, ConnectionOptions, default_target
from pipeserve.client.pipeline import RemotePipeline, pipeline

TOKEN_ENV = "PIPESERVE_TOKEN"


def _add_connection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=None,
                       help=f"host:port or unix:/path (default ${TARGET_ENV}, else localhost:8001)")
    group.add_argument("--token", default=None, help=f"bearer token (default ${TOKEN_ENV})")
    group.add_argument("--timeout", type=float, default=None, help="seconds for the call, retries included")
    group.add_argument("--retries", type=int, default=3, help="attempts after the first on UNAVAILABLE")
    group.add_argument("--wait-for-ready", action="store_true", help="wait for the server to come up")
    group.add_argument("--tls-ca", default=None, help="PEM of the CA that signed the server's certificate")
    group.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    group.add_argument("--tls-cert", default=None, help="client certificate (mTLS)")
    group.add_argument("--tls-key", default=None, help="client private key (mTLS)")
    group.add_argument("--tls-server-name", default=None, help="name the server's certificate carries")


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "target": args.target or default_target(),
        "token": args.token or os.environ.get(TOKEN_ENV) or None,
        "timeout": args.timeout,
        "retries": args.retries,
        "wait_for_ready": args.wait_for_ready,
        "tls_ca": args.tls_ca or (True if args.tls else None),
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_server_name": args.tls_server_name,
    }


def parse_value(raw: str) -> Any:
    """A --param value: JSON when it parses (2, 0.5, true, null, [..], {..}), else the string."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def parse_params(pairs: Iterable[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param expects key=value, got {pair!r}")
        params[key.replace("-", "_")] = parse_value(raw)
    return params


def _inputs(args: argparse.Namespace) -> Any:
    """The positional inputs (or stdin's lines): one value alone, several as a list."""
    items = list(args.inputs) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not items:
        raise SystemExit("no input: pass it as an argument or on stdin")
    if args.json_inputs:
        items = [json.loads(item) for item in items]
    return items[0] if len(items) == 1 else items


def _print_json(value: Any, indent: int | None) -> None:
    print(json.dumps(value, indent=indent, ensure_ascii=False, default=str), flush=True)


def _report(error: grpc.RpcError) -> int:
    print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
    return 1


def _call(args: argparse.Namespace) -> int:
    try:
        with pipeline(args.task, args.model, **_connection(args)) as remote:
            result = remote(_inputs(args), **parse_params(args.param))
    except grpc.RpcError as exc:
        return _report(exc)
    except (TypeError, ValueError) as exc:  # an unknown task, or parameters the codec refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_json(result, args.indent)
    return 0


def _generate(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    if args.max_new_tokens is not None:
        params["max_new_tokens"] = args.max_new_tokens
    try:
        with pipeline("text-generation", args.model, **_connection(args)) as remote:
            if args.stream:
                return _generate_stream(remote, args.prompt, params, args.json)
            result = remote(args.prompt, **params)
    except grpc.RpcError as exc:
        return _report(exc)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        _print_json(result, None)
    else:
        print(result[0]["generated_text"] if isinstance(result, list) and result else result, flush=True)
    return 0


def _generate_stream(remote: RemotePipeline, prompt: str, params: dict[str, Any], as_json: bool) -> int:
    stream = getattr(remote, "stream", None)
    if stream is None:
        print("error: this client's text-generation pipeline has no stream()", file=sys.stderr)
        return 2
    for piece in stream(prompt, **params):
        if as_json:  # one JSON object per line, as the server sent it
            _print_json(dataclasses.asdict(piece) if dataclasses.is_dataclass(piece) else piece, None)
        else:
            sys.stdout.write(_piece_text(piece))
            sys.stdout.flush()
    if not as_json:
        print(flush=True)
    return 0


def _piece_text(piece: Any) -> str:
    """The new text of one streamed piece: a string, or a dict such as {"token": {"text": ...}}."""
    if isinstance(piece, str):
        return piece
    if isinstance(piece, dict):
        for key in ("text", "generated_text"):
            if isinstance(piece.get(key), str):
                return piece[key]
        token = piece.get("token")
        if isinstance(token, dict) and isinstance(token.get("text"), str):
            return token["text"]
    text = getattr(piece, "text", None)
    return text if isinstance(text, str) else ""


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    options = ConnectionOptions(**_connection(args))
    with options.sync_channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout or 5,
                                  wait_for_ready=args.wait_for_ready)
        except grpc.RpcError as exc:
            return _report(exc)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `call`, `generate` and `health` to the `pipeserve` command."""
    call = sub.add_parser("call", help="run any task on the server, print the result as JSON",
                          description="Run a task (e.g. sentiment-analysis) on a pipeserve server and print "
                                      "the result as transformers' pipeline returns it, as JSON.")
    call.add_argument("task", help="task or alias, e.g. sentiment-analysis, feature-extraction")
    call.add_argument("inputs", nargs="*", help="inputs (several: a batch); none: one per line of stdin")
    call.add_argument("--model", default=None, help="model name (default: the server's default for the task)")
    call.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                      help="a call parameter, e.g. top_k=2 (values parse as JSON when they can)")
    call.add_argument("--json-inputs", action="store_true", help="parse each input as JSON (e.g. {\"question\": ...})")
    call.add_argument("--indent", type=int, default=None, help="pretty-print the JSON")
    _add_connection_flags(call)
    call.set_defaults(func=_call)

    generate = sub.add_parser("generate", help="generate text, optionally streaming tokens as they come")
    generate.add_argument("prompt")
    generate.add_argument("--stream", action="store_true", help="print text as it is generated")
    generate.add_argument("--model", default=None)
    generate.add_argument("--max-new-tokens", type=int, default=None)
    generate.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                          help="a generation parameter, e.g. do_sample=true temperature=0.7")
    generate.add_argument("--json", action="store_true", help="print JSON (with --stream: one object per line)")
    _add_connection_flags(generate)
    generate.set_defaults(func=_generate)

    health = sub.add_parser("health", help="check grpc.health.v1; exit 0 when SERVING")
    health.add_argument("--service", default="", help='"" (the server), "liveness", "readiness" or a service name')
    _add_connection_flags(health)
    health.set_defaults(func=_health)
