"""Generate the gRPC Python stubs from `protos/emoq/v1/emoq.proto` into `emoq_serve/_proto/`.

Why at install time and not committed: generated stubs pin the grpcio/protobuf versions they
were made with (ARCHITECTURE.md), so they are made by `make setup` with the installed
grpcio-tools. The include path maps the proto folder onto the package folder
(`-Iemoq_serve/_proto=protos/emoq/v1`), so the generated `emoq_pb2_grpc.py` imports
`emoq_serve._proto.emoq_pb2` and works wherever the package is importable.

Run: `python -m emoq_serve.protos_build`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent / "protos" / "emoq" / "v1"
OUT_DIR = PACKAGE_DIR / "_proto"


def build() -> list[Path]:
    """Run protoc (from grpc_tools) and return the generated files."""
    from grpc_tools import protoc

    proto = PROTO_DIR / "emoq.proto"
    if not proto.is_file():
        raise FileNotFoundError(f"{proto} not found: protos_build runs from a source checkout")
    root = PACKAGE_DIR.parent
    args = [
        "grpc_tools.protoc",
        f"-I{OUT_DIR.relative_to(root)}={PROTO_DIR.relative_to(root)}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        str((OUT_DIR / proto.name).relative_to(root)),
    ]
    # protoc resolves the virtual path against the -I mapping, so it must run from the root.
    cwd = Path.cwd()
    try:
        os.chdir(root)
        code = protoc.main(args)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return sorted(OUT_DIR.glob("emoq_pb2*.py*"))


def main() -> int:
    for path in build():
        print(f"generated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
