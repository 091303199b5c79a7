"""The ASR lever table: what each way of making a segment's transcription cheaper costs in word
errors and buys in time, one row per setting, from one run.

Run: `python -m benchmarks.bench_asr_levers [--clips-per-voice 40] [--only NAME ...]`; writes
`benchmarks/results/asr_levers/<cpu_class>.json` and `.md`.

Clips: the mixed synthetic corpus's test split (`bench_asr.corpus_test_split`, Piper and espeak-ng
voices). Per setting (an `AsrConfig`; the served default is the row named `default`):

- **alone**: every clip transcribed by itself on the caller's thread, with an empty queue (so
  the adaptive beam uses `beam_size`): per-clip latency (median and p10/p90 spread), WER per voice.
- **backlog**: every clip submitted at once to the engine's real worker (the server's ASR under a
  flood: batches up to `max_batch`, the adaptive beam drops to greedy): clips per second, mean
  batch and beam, WER per voice. With `threads=2` the row uses both cores.

WER is jiwer over Whisper's English normaliser (`emoq_serve.metrics.word_error_rate`), as in
`bench_asr`. Interims never run ASR (docs/serving.md), so they have no row. Latency moves with the
machine's load: the record keeps the load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_asr import _wer_by_voice, corpus_test_split
from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.hostinfo import cpu_class, simd_flags
from emoq_serve.speech.asr import AsrConfig, AsrEngine

RESULTS_DIR = Path(__file__).parent / "results" / "asr_levers"

#: (name, what the row changes, AsrConfig) in table order; the first is the old served setting.
SETTINGS: tuple[tuple[str, str, AsrConfig], ...] = (
    ("full-beam5", "before: 30 s window, beam 5, one clip per call",
     AsrConfig(window="full", beam_size=5, greedy_above_queue=None, max_batch=1)),
    ("full-greedy", "30 s window, greedy", AsrConfig(window="full", beam_size=1, max_batch=1)),
    ("full-greedy-fp32", "30 s window, greedy, float32 kernels (int8 off)",
     AsrConfig(window="full", beam_size=1, max_batch=1, compute_type="float32")),
    ("fit5-beam5", "window fit to the clip (>= 5 s), beam 5 always, one clip per call",
     AsrConfig(min_window_s=5, beam_size=5, greedy_above_queue=None, max_batch=1)),
    ("fit5-greedy", "fit (>= 5 s), greedy, one clip per call", AsrConfig(min_window_s=5, beam_size=1, max_batch=1)),
    ("fit8-greedy", "fit (>= 8 s), greedy, one clip per call", AsrConfig(min_window_s=8, beam_size=1, max_batch=1)),
    ("fit5-greedy-b4", "fit (>= 5 s), greedy, batches of 4", AsrConfig(min_window_s=5, beam_size=1, max_batch=4)),
    ("fit5-greedy-b8", "fit (>= 5 s), greedy, batches of 8", AsrConfig(min_window_s=5, beam_size=1, max_batch=8)),
    ("fit5-greedy-fp32", "fit (>= 5 s), greedy, float32 kernels (int8 off)",
     AsrConfig(min_window_s=5, beam_size=1, max_batch=4, compute_type="float32")),
    ("default", ("served default: fit (>= 5 s), beam 5 while nothing else waits, greedy behind a backlog, "
     "batches of 4"), AsrConfig()),
    ("default-2threads", "served default with 2 CTranslate2 threads (the emotion stages' core too)",
     AsrConfig(threads=2)),
)


def _spread(latencies_s: list[float]) -> dict[str, float]:
    ms = np.array(latencies_s) * 1e3
    return {"p50": float(np.median(ms)), "p10": float(np.percentile(ms, 10)), "p90": float(np.percentile(ms, 90)),
            "max": float(ms.max())}


def measure(cfg: AsrConfig, examples) -> dict:
    audio = [ex.audio for ex in examples]
    engine = AsrEngine(dataclasses.replace(cfg, queue_size=len(audio) + 1))
    try:
        engine.transcribe_batch([audio[0]])  # warm-up: first-call allocations
        alone, latencies = [], []
        for clip in audio:
            t0 = time.perf_counter()
            alone.append(engine.transcribe_batch([clip])[0])
            latencies.append(time.perf_counter() - t0)
        engine.start()
        t0 = time.perf_counter()
        results = [f.result() for f in [engine.submit(clip) for clip in audio]]
        backlog_s = time.perf_counter() - t0
    finally:
        engine.close()
    seconds = sum(len(a) for a in audio) / SAMPLE_RATE
    return {
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("model_dir", "queue_size")},
        "compute_type": engine.compute_type, "max_batch": engine.max_batch,
        "alone": {"latency_ms": _spread(latencies), "real_time_factor": sum(latencies) / seconds,
                  "wer": _wer_by_voice(examples, alone)},
        "backlog": {"clips_per_s": len(audio) / backlog_s, "real_time_factor": backlog_s / seconds,
                    "mean_batch": statistics.fmean(r.batch_size for r in results),
                    "beam_share": sum(r.beam_size > 1 for r in results) / len(results),
                    "wer": _wer_by_voice(examples, [r.text for r in results])},
    }


def run(clips_per_voice: int, only: list[str] | None) -> dict:
    examples = corpus_test_split(clips_per_voice)
    load_before = machine_description()["load_average"]
    rows = []
    for name, what, cfg in SETTINGS:
        if only and name not in only:
            continue
        print(f"{name}: {what}", flush=True)
        rows.append({"name": name, "what": what, **measure(cfg, examples)})
    seconds = [len(ex.audio) / SAMPLE_RATE for ex in examples]
    return {
        "cpu_class": cpu_class(),
        "corpus": {"split": "test", "clips": len(examples), "audio_seconds_mean": statistics.fmean(seconds),
                   "audio_seconds_max": max(seconds), "clips_per_voice": clips_per_voice},
        "rows": rows,
        "machine": {**machine_description(), "load_average_before": load_before, "cpu_flags": simd_flags()},
        "versions": library_versions(),
    }


def markdown(report: dict) -> str:
    c = report["corpus"]
    lines = ["# ASR levers: cost and word errors per setting", "",
             (f"Whisper tiny.en (CTranslate2) on {c['clips']} test clips of the synthetic corpus (mean "
             f"{c['audio_seconds_mean']:.1f} s, max {c['audio_seconds_max']:.1f} s), half Piper, half espeak-ng. "
             "*Alone*: one clip at a time, empty queue. *Backlog*: all clips queued at once on the engine's worker "
             "(batches, adaptive beam). Written by `python -m benchmarks.bench_asr_levers`."), "",
             ("| setting | what | alone p50 ms (p10-p90) | alone WER Piper / espeak | backlog clips/s | mean batch "
             "| beam share | backlog WER Piper / espeak |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        a, b = r["alone"], r["backlog"]
        lat = a["latency_ms"]
        lines.append(f"| {r['name']} | {r['what']} | {lat['p50']:.0f} ({lat['p10']:.0f}-{lat['p90']:.0f}) | "
                     f"{a['wer']['piper']['wer']:.3f} / {a['wer']['espeak']['wer']:.3f} | {b['clips_per_s']:.2f} | "
                     f"{b['mean_batch']:.1f} | {b['beam_share']:.2f} | "
                     f"{b['wer']['piper']['wer']:.3f} / {b['wer']['espeak']['wer']:.3f} |")
    m = report["machine"]
    lines += ["", (f"Machine: {m['cpu_model']} ({report['cpu_class']}), {m['logical_cores']} logical cores, load "
              f"average before {m['load_average_before'][0]:.2f}, after {m['load_average'][0]:.2f} "
              "(latencies move with the load).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips-per-voice", type=int, default=40)
    p.add_argument("--only", nargs="+", choices=[name for name, _, _ in SETTINGS], help="run just these rows")
    p.add_argument("--out", type=Path, default=None, help="default: results/asr_levers/<cpu_class>.json")
    args = p.parse_args(argv)
    report = run(args.clips_per_voice, args.only)
    out = args.out or RESULTS_DIR / f"{report['cpu_class']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
