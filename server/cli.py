"""The `pipeserve` command: serve, manage the model repository, export models, call the server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from pipeserve.server.settings import ServerSettings

DEFAULT_REPOSITORY = os.environ.get("PIPESERVE_MODEL_REPOSITORY", "model_repository")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="run the gRPC server", description="Run the gRPC server. Every flag "
                            "also comes from the environment variable PIPESERVE_<FLAG> (e.g. PIPESERVE_PORT).")
    defaults = ServerSettings.from_env()
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        env = ServerSettings.env_name(f.name)
        if isinstance(value, list):
            parser.add_argument(flag, nargs="*", default=value, help=f"(env {env})")
        elif isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"(env {env})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"default {value!s} (env {env})")
    parser.set_defaults(func=_serve)


def configure_logging(level: str, fmt: str = "text") -> None:
    if fmt == "json":
        format_ = '{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","message":"%(message)s"}'
    else:
        format_ = "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=format_, stream=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    # Set before torch loads OpenMP: model workers share the cores with the event loop and gRPC's
    # threads, and OpenMP workers that spin while they wait turn each preemption into a stall
    # (a tiny model's call measured 167 ms instead of 2.6 ms on a 2-core VM). Override to compare.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipeserve.server.app import serve

    settings = ServerSettings(**{f.name: getattr(args, f.name) for f in fields(ServerSettings)})
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))


def _models_init(args: argparse.Namespace) -> int:
    from pipeserve.model_builder import build_default_repository

    started = time.perf_counter()

    def progress(name: str, index: int, total: int) -> None:
        print(f"[{index + 1}/{total}] {name} ({time.perf_counter() - started:.1f}s)", flush=True)

    built = build_default_repository(Path(args.dir), progress=progress, only=set(args.only) if args.only else None,
                                     force=args.force)
    print(f"built {len(built)} model(s) in {Path(args.dir)} in {time.perf_counter() - started:.1f}s"
          + (f": {', '.join(built)}" if built else " (all present)"))
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from pipeserve.server.repository.config import CONFIG_FILE, read_model_config_fields
    from pipeserve.server.repository.repository import ModelRepository

    repo = ModelRepository(Path(args.dir))
    for name in repo.model_names():
        # The fields as written, unvalidated: a listing shows a model whose config is wrong too.
        fields = read_model_config_fields(repo.model_folder(name) / CONFIG_FILE)
        print(f"{name:24} {fields.get('task', ''):28} {fields.get('backend') or 'eager'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeserve", description="A gRPC model server for transformers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)

    models = sub.add_parser("models", help="manage a model repository")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    init = models_sub.add_parser("init", help="build the default model repository offline")
    init.add_argument("dir", nargs="?", default=DEFAULT_REPOSITORY)
    init.add_argument("--only", nargs="*", help="build only these models")
    init.add_argument("--force", action="store_true", help="rebuild models that exist")
    init.set_defaults(func=_models_init)
    listing = models_sub.add_parser("list", help="list the models of a repository")
    listing.add_argument("dir", nargs="?", default=DEFAULT_REPOSITORY)
    listing.set_defaults(func=_models_list)

    for extend in _extensions():
        extend(sub)
    return parser


def _extensions():
    """Subcommands that live beside their feature (export, call, generate)."""
    found = []
    for module, attr in (("pipeserve.server.export.cli", "add_subcommand"), ("pipeserve.client.cli", "add_subcommands")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue
            raise
        found.append(getattr(mod, attr))
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
