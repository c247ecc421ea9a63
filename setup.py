"""Compiles protos/ into the pipeserve.v1 package when the distribution is built.

`make proto` does the same for a development checkout; generated code is never committed or
edited by hand.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTOS = ROOT / "protos"


def compile_protos() -> None:
    from grpc_tools import protoc

    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "pipeserve" / "v1").glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={PROTOS}", f"--pyi_out={PROTOS}",
            f"--grpc_python_out={PROTOS}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(files))


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
