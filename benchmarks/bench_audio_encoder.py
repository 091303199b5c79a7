"""Audio encoder speed: the exported ONNX graph in onnxruntime vs eager PyTorch HuBERT.

Run: `python -m benchmarks.bench_audio_encoder [--preset base] [--threads 2] [--reps 10]`.

Both engines run the same padded batch (default 8 x 3 s) in the same process, interleaved rep
by rep so load from other processes hits both alike; the ratio of medians is reported. The
ONNX side is exactly what ships: `export_audio_encoder` + the offline ORT pass, run through the
runtime's `OrtStage` (IO binding, explicit intra-op threads). torch intra-op threads and ORT
intra-op threads are set to the same value and recorded. Parity of the frames is checked too,
so a fast but wrong graph cannot produce a result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE, preset
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.executors.ort import OrtStage
from export.onnx_export import export_audio_encoder, optimize_offline

RESULTS_DIR = Path(__file__).parent / "results"


def run(preset_name: str, batch: int, seconds: float, threads: int, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    encoder = AudioEncoder(preset(preset_name).audio).eval()
    samples = int(seconds * SAMPLE_RATE)
    waveforms = 0.1 * torch.randn(batch, samples)
    lengths = torch.full((batch,), samples, dtype=torch.int64)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = export_audio_encoder(encoder, Path(tmp) / "audio_encoder.onnx")
        optimization = optimize_offline(path).to_dict()
        export_s = time.perf_counter() - started
        stage = OrtStage(path, threads)

        def ort_run() -> torch.Tensor:
            return stage.run(waveforms=waveforms, lengths=lengths)["frames"]

        def eager_run() -> torch.Tensor:
            with torch.inference_mode():
                return encoder(waveforms, lengths)[0]

        max_abs = float((ort_run() - eager_run()).abs().max())
        times: dict[str, list[float]] = {"ort": [], "eager": []}
        for rep in range(warmup + reps):
            for name, fn in (("ort", ort_run), ("eager", eager_run)):
                t0 = time.perf_counter()
                fn()
                if rep >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "benchmark": "audio_encoder_ort_vs_eager",
        "preset": preset_name,
        "batch": batch,
        "seconds": seconds,
        "torch_threads": threads,
        "ort_intra_op_threads": threads,
        "reps": reps,
        "warmup": warmup,
        "export_and_optimize_s": round(export_s, 1),
        "ort_optimization": optimization,
        "frames_max_abs_diff": max_abs,
        "median_ms": medians,
        "times_ms": times,
        "speedup_eager_over_ort": medians["eager"] / medians["ort"],
        "machine": machine_description(),
        "versions": library_versions(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base", help="model preset whose audio encoder shape is used")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    result = run(args.preset, args.batch, args.seconds, args.threads, args.reps, args.warmup)
    if result["frames_max_abs_diff"] > 1e-3:
        raise SystemExit(f"ORT frames differ from eager by {result['frames_max_abs_diff']:.3g}; not reporting speed")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"audio_encoder_{args.preset}_cpu.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.preset} audio encoder, batch {args.batch} x {args.seconds:g} s, {args.threads} threads: "
          f"eager {result['median_ms']['eager']:.1f} ms, ORT {result['median_ms']['ort']:.1f} ms, "
          f"ratio {result['speedup_eager_over_ort']:.2f}x (frames max abs diff {result['frames_max_abs_diff']:.2g}) -> {out}")


if __name__ == "__main__":
    main()
