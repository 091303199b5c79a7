"""`python -m training stage1|stage2 ...`: `emoq train` from a source tree that is not installed
(the `emoq` command finds `train` through package entry points, which need an install); the GPU
acceptance script's bare mode runs training this way."""

from __future__ import annotations

import argparse
import sys

from training.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
