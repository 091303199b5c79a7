"""Where the demo bundle lives, and how `emoq serve` without `--bundle` gets one.

Building the demo bundle needs training and export, which sit above this package; they plug
in through the `emoq.bundle_builders` entry point (name `demo`) so imports still flow one way.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from emoq_serve.config import cache_root


def demo_dir(key: str) -> Path:
    """The folder of one demo build (bundle/ and report.json) under the cache root."""
    return cache_root() / "demo" / key


def default_bundle_path() -> Path:
    """The default demo bundle, built on first use by the registered builder."""
    builders = {ep.name: ep for ep in entry_points(group="emoq.bundle_builders")}
    if "demo" not in builders:
        raise RuntimeError("no demo bundle builder is installed: run `make setup`, or pass --bundle DIR")
    return Path(builders["demo"].load()())
