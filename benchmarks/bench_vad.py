"""Silero VAD cost per 512-sample window, one stream per step against streams batched per step.

Run: `python -m benchmarks.bench_vad [--batches 1 2 4 8 16 32 64] [--repeats 200]`.

The server's `VadBatcher` scores the next window of every waiting VOICE_ACTIVITY stream in one
onnxruntime call; this measures what that saves on this machine (single-threaded ORT session, as
the server runs it). Each point: median seconds per step over `--repeats` steps on speech-like
noise, after a warm-up; per window = per step / batch; ratios against batch 1 in the same run. One
real-time stream needs 31.25 windows a second, so `core_share_per_stream` is the fraction of one
core the VAD costs per real-time stream at that batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from emoq_serve.hostinfo import simd_flags
from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.speech.vad import WINDOW, SileroVad

RESULTS_DIR = Path(__file__).parent / "results"


def run(batches: list[int], repeats: int) -> dict:
    vad = SileroVad(threads=1)
    rng = np.random.default_rng(0)
    points = []
    for b in batches:
        states = [vad.new_state() for _ in range(b)]
        windows = (rng.standard_normal((b, WINDOW)) * 0.1).astype(np.float32)
        for _ in range(20):
            vad.step(states, windows)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            vad.step(states, windows)
            times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        points.append({"batch": b, "step_us": step * 1e6, "window_us": step / b * 1e6,
                       "core_share_per_stream": step / b * SAMPLE_RATE / WINDOW})
    base = points[0]["window_us"]
    for p in points:
        p["window_cost_vs_batch_1"] = p["window_us"] / base
    return {"points": points, "repeats": repeats, "ort_threads": 1, "machine": machine_description(),
            "cpu_flags": simd_flags(), "libraries": library_versions()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "vad_cpu.json")
    args = ap.parse_args()
    result = run(args.batches, args.repeats)
    for p in result["points"]:
        print(f"batch {p['batch']:3d}: {p['step_us']:8.0f} us/step {p['window_us']:6.1f} us/window "
              f"({p['window_cost_vs_batch_1']:.2f}x batch 1), {100 * p['core_share_per_stream']:.2f}% core per stream")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
