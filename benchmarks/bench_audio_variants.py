"""Audio encoder precision variants on this CPU: which one the runtime should pick.

Run: `python -m benchmarks.bench_audio_variants [--preset base] [--seconds 3] [--reps 7]`.

One clip, one thread (the `cpu` preset's budget per stage), interleaved rep by rep so load from
other processes hits every variant alike: eager PyTorch fp32 and bf16 (autocast), the exported
graph in onnxruntime fp32, the same graph with its MatMuls dynamically quantised to int8 (VNNI;
convolutions stay fp32), and the same graph in OpenVINO in f32 and bf16. Each variant's frames
are compared with eager fp32 (max abs and cosine) next to its median time, its GFLOP/s and its
share of the matmul peak of its precision measured in the same run on one thread. Random
weights (no pretrained HuBERT ships here) show speed and drift, not accuracy: accuracy is
measured on the trained demo bundle (`emoq eval --runtime cpu`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks import flops
from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE, preset
from emoq_serve.model.audio_encoder import AudioEncoder
from emoq_serve.executors.openvino import OvStage
from emoq_serve.executors.ort import OrtStage
from export.onnx_export import export_audio_encoder, optimize_offline

RESULTS_DIR = Path(__file__).parent / "results"


def quantize_int8(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     use_external_data_format=True)
    return dst


def run(preset_name: str, seconds: float, reps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = preset(preset_name)
    encoder = AudioEncoder(cfg.audio).eval()
    samples = int(seconds * SAMPLE_RATE)
    waveforms, lengths = 0.1 * torch.randn(1, samples), torch.tensor([samples])
    with tempfile.TemporaryDirectory() as tmp:
        graph = export_audio_encoder(encoder, Path(tmp) / "audio_encoder.onnx")
        int8 = quantize_int8(graph, Path(tmp) / "audio_encoder_int8.onnx")  # from the unoptimised graph
        optimize_offline(graph)  # extended fusions, as the CPU provider's load-time pass applies them
        stages = {"ort_fp32": OrtStage(graph, 1), "ort_int8": OrtStage(int8, 1),
                  "openvino_f32": OvStage(graph, 1, "float32"), "openvino_bf16": OvStage(graph, 1, "bfloat16")}

        def eager(bf16: bool) -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return encoder(waveforms, lengths)[0].float()

        variants = {"eager_fp32": lambda: eager(False), "eager_bf16": lambda: eager(True),
                    **{name: (lambda s=s: s.run(waveforms=waveforms, lengths=lengths)["frames"])
                       for name, s in stages.items()}}
        reference = eager(False)
        drift = {}
        for name, fn in variants.items():
            out = fn().float()
            drift[name] = {"frames_max_abs": float((out - reference).abs().max()),
                           "cosine": float(torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), 0))}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(warmup + reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                if rep >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    gflop = flops.audio_encoder_flops(cfg.audio, samples) / 1e9
    peaks = {d: asdict(flops.matmul_peak(1, d)) for d in ("float32", "bfloat16")}
    precision = {"eager_bf16": "bfloat16", "openvino_bf16": "bfloat16"}
    results = {}
    for name, t in times.items():
        median = statistics.median(t)
        peak = peaks[precision.get(name, "float32")]["gflops"]
        results[name] = {"median_ms": median, "gflops": gflop / (median / 1e3),
                         "pct_of_peak": 100 * gflop / (median / 1e3) / peak,
                         "peak": precision.get(name, "float32"), **drift[name], "times_ms": t}
    return {"benchmark": "audio_encoder_variants", "preset": preset_name, "seconds": seconds, "batch": 1,
            "threads": 1, "reps": reps, "warmup": warmup, "gflop": gflop, "matmul_peak_1t": peaks,
            "variants": results, "machine": machine_description(), "versions": library_versions()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    result = run(args.preset, args.seconds, args.reps, args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"audio_encoder_variants_{args.preset}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"{args.preset} audio encoder, 1 x {args.seconds:g} s, 1 thread ({result['gflop']:.1f} GFLOP):")
    for name, r in result["variants"].items():
        print(f"  {name:14s} {r['median_ms']:7.1f} ms  {r['gflops']:6.1f} GFLOP/s ({r['pct_of_peak']:3.0f}% of "
              f"{r['peak']} peak)  frames max abs {r['frames_max_abs']:.3g}, cosine {r['cosine']:.5f}  -> {out}")


if __name__ == "__main__":
    main()
