"""The `emoq` command line.

`serve` and `client` live in this package. `train`, `eval`, `export`, `demo` and `bench` are
contributed by the packages that build on emoq_serve (`training`, `export`, `benchmarks`)
through the `emoq.commands` entry-point group, so imports keep flowing one way.

A contributed command is a `register(subparsers) -> None` function that adds its parser and
sets `func` (a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def _builtin_commands(sub: argparse._SubParsersAction) -> None:
    from emoq_serve.server.cli import register as register_serve
    from emoq_serve.client import register as register_client

    register_serve(sub)
    register_client(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emoq", description="EmoQ speech emotion recognition serving stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _builtin_commands(sub)
    for ep in sorted(entry_points(group="emoq.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # the ONNX exporter narrates every rewrite at INFO
        for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
