"""Attentive-pooling micro-benchmark: Triton kernel vs torch reference vs torch.compile(reference).

Run: `python -m benchmarks.bench_pooling [--threads 1] [--out benchmarks/results]`.

Shapes are the serving ones (B in {1, 8, 64, 256}, N = 32 query states, D in {384, 768},
H in {4, 8, 12}; no mask, every query is valid) plus long-N shapes (masked frames) that exercise
the kernel's tiling. On CPU the Triton kernel cannot run compiled (only interpreted, which says
nothing about speed), so only the reference and torch.compile are timed and the JSON says so.
On a GPU the kernel is timed too, with achieved bandwidth (bytes that must be read and written
once, over time) against the card's peak, since pooling is memory-bound.

Threads are set explicitly (default 1) and recorded: on the shared 2-core machines two intra-op
threads can be far slower than one for ops this small when other processes compete.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import library_versions, machine_description
from emoq_serve.kernels import attentive_pool_reference

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class PoolShape:
    batch: int
    length: int
    dim: int
    heads: int
    masked: bool


SERVING_SHAPES = tuple(
    PoolShape(b, 32, d, h, masked=False) for b in (1, 8, 64, 256) for d in (384, 768) for h in (4, 8, 12)
)
LONG_SHAPES = (
    PoolShape(1, 1024, 768, 12, masked=True),
    PoolShape(1, 4096, 768, 12, masked=True),
    PoolShape(8, 4096, 384, 4, masked=True),
)


def make_inputs(shape: PoolShape, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, u and (for masked shapes) a mask whose rows keep a random prefix, like padded frames."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape.batch, shape.length, shape.dim, generator=gen).to(device, dtype)
    u = torch.randn(shape.heads, shape.dim // shape.heads, generator=gen).to(device, dtype)
    if not shape.masked:
        return x, u, None
    lengths = torch.randint(shape.length // 2, shape.length + 1, (shape.batch, 1), generator=gen)
    return x, u, (torch.arange(shape.length) < lengths).to(device)


def bytes_moved(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The minimum traffic of a fused pooling: read x, u and mask once, write [B,D] once."""
    out = x.shape[0] * x.shape[2] * x.element_size()
    return x.numel() * x.element_size() + u.numel() * u.element_size() + (mask.numel() if mask is not None else 0) + out


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth from the device properties (DDR: two transfers per clock)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def median_ms(fn: Callable[[], Any], device: str, repeats: int, budget_s: float) -> float:
    """Median wall time of one call after warm-up; stops early once `budget_s` is spent."""
    if device == "cuda":
        from triton.testing import do_bench  # flushes L2 between runs, so x really comes from DRAM

        return float(do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1000)), return_mode="median"))
    for _ in range(2):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def compiled_reference() -> Callable[..., torch.Tensor] | None:
    """torch.compile of the reference with dynamic shapes (one graph for B and N), or None if it fails."""
    compiled = torch.compile(attentive_pool_reference, dynamic=True)
    try:
        compiled(torch.randn(2, 3, 8), torch.randn(2, 4), None)
    except Exception as err:  # noqa: BLE001 - a missing compiler toolchain just drops the column
        warnings.warn(f"torch.compile unavailable ({type(err).__name__}: {err}); skipping it", RuntimeWarning)
        return None
    return compiled


def bench_shape(
    shape: PoolShape, dtype: torch.dtype, device: str, compiled: Callable[..., torch.Tensor] | None,
    repeats: int, budget_s: float,
) -> dict[str, Any]:
    x, u, mask = make_inputs(shape, dtype, device)
    row: dict[str, Any] = {**asdict(shape), "bytes": bytes_moved(x, u, mask)}
    with torch.inference_mode():
        row["reference_ms"] = median_ms(lambda: attentive_pool_reference(x, u, mask), device, repeats, budget_s)
        if compiled is not None:
            row["compiled_ms"] = median_ms(lambda: compiled(x, u, mask), device, repeats, budget_s)
        if device == "cuda":
            from emoq_serve.kernels.ops.attentive_pool import attentive_pool_triton

            row["triton_ms"] = median_ms(lambda: attentive_pool_triton(x, u, mask), device, repeats, budget_s)
            ref = attentive_pool_reference(x, u, mask).float()
            row["triton_max_abs_err"] = (attentive_pool_triton(x, u, mask).float() - ref).abs().max().item()
    for impl in ("reference", "compiled", "triton"):
        if f"{impl}_ms" in row:
            row[f"{impl}_gbs"] = row["bytes"] / (row[f"{impl}_ms"] * 1e-3) / 1e9
    return row


def run(threads: int, dtype: torch.dtype, repeats: int, budget_s: float, use_compile: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compiled = compiled_reference() if use_compile else None
    machine = machine_description()
    report: dict[str, Any] = {
        "benchmark": "attentive_pooling",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else machine["cpu_model"],
        "machine": machine,
        "libraries": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "statistic": "median milliseconds per call" + (" (triton.testing.do_bench, L2 flushed)" if device == "cuda" else ""),
        "implementations": ["reference"] + (["compiled"] if compiled else []) + (["triton"] if device == "cuda" else []),
        "note": None if device == "cuda" else
        "CPU: the Triton kernel only runs under the interpreter here, so it is not timed; "
        "reference and torch.compile(reference) only.",
    }
    if device == "cuda":
        report["peak_bandwidth_gbs"] = peak_bandwidth_gbs(torch.device("cuda"))
    rows = []
    for shape in SERVING_SHAPES + LONG_SHAPES:
        row = bench_shape(shape, dtype, device, compiled, repeats, budget_s)
        if report.get("peak_bandwidth_gbs") and "triton_gbs" in row:
            row["triton_fraction_of_peak"] = row["triton_gbs"] / report["peak_bandwidth_gbs"]
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    report["results"] = rows
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per shape (CPU)")
    parser.add_argument("--budget-s", type=float, default=0.5, help="time budget per shape and implementation")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    report = run(args.threads, getattr(torch, args.dtype), args.repeats, args.budget_s, not args.no_compile)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pooling_{report['device']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path} ({report['device_name']}, {report['torch_threads']} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
