"""What this host is: its CPU's instruction-set flags and model, and installed library versions.

One copy of each, for the runtime's precision choice, the graph cache key, GetModelInfo, bundle
manifests and every benchmark record.
"""

from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version


@functools.cache
def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == name), "")
    except OSError:
        return ""


def cpu_flags() -> frozenset[str]:
    """Every flag /proc/cpuinfo lists (empty where there is no such file)."""
    return frozenset(_cpuinfo_field("flags").split())


def simd_flags() -> list[str]:
    """The flags that decide which kernels run (AVX*, AMX, FMA, F16C), sorted, for records."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); AVX2 only emulates it."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_class() -> str:
    """The CPU class tuned settings and benchmark results are named by: amx, avx512_bf16 or avx2."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512" if "avx512f" in flags else "avx2"


def library_versions(*dists: str) -> dict[str, str]:
    """Installed version of each distribution, "absent" for one that is not installed."""
    found = {}
    for name in dists:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found
