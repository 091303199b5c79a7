"""`emoq demo`: the whole product on one machine, from nothing to predictions over gRPC.

First run: synthetic spoken corpus (half the utterances in the neural Piper voice, half in
espeak-ng's voices) -> stage 1 (MiniLM-initialised former) -> stage 2 (LoRA LLM)
-> export with parity verification -> cached bundle. Every run: start the real gRPC server on
127.0.0.1, stream the demo utterances through the real client, print the predictions, drain and
stop. It lives in `export/` because building the bundle needs training and export, which
`emoq_serve` itself may not import; `emoq serve` without `--bundle` reaches
`build_demo_bundle` through the `emoq.bundle_builders` entry point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emoq_serve.demo_bundle import demo_dir

if TYPE_CHECKING:
    from emoq_serve.client.api import EmotionResult
    from emoq_serve.data.conversation import Conversation
    from emoq_serve.data.types import Example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo builds. `quick` is CI's reduced-time mode: the tiny preset, a smaller
    corpus and fewer epochs, but every stage still runs for real."""

    preset: str = "small"
    clips_per_class: int = 100
    stage1_epochs: int = 5
    stage2_epochs: int = 5
    seed: int = 0

    @property
    def key(self) -> str:
        """The cache folder's name: a changed recipe (or `DEMO_VERSION`) never reuses an old bundle."""
        return (f"v{DEMO_VERSION}-{self.preset}-n{self.clips_per_class}"
                f"-e{self.stage1_epochs}.{self.stage2_epochs}-s{self.seed}")


#: Bump when the demo model changes in a way its `DemoConfig` does not show (preset shapes,
#: learning rates), so cached bundles of the old model are rebuilt.
DEMO_VERSION = 3  # 3: the corpus mixes the Piper and espeak-ng voices


DEMO_PRESETS = {
    "full": DemoConfig(),
    "quick": DemoConfig(preset="tiny", clips_per_class=40, stage1_epochs=15, stage2_epochs=12),
    # `emoq demo --llm smollm2`: the same corpus and former, a real pretrained LLM (SmolLM2-135M-Instruct).
    "smollm2": DemoConfig(preset="smollm2", stage2_epochs=2),
}
#: `emoq demo --llm NAME` -> its DEMO_PRESETS entry.
DEMO_LLMS = {"toy": "full", "smollm2": "smollm2"}


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def build_demo_bundle(cfg: DemoConfig = DEMO_PRESETS["full"], rebuild: bool = False) -> Path:
    """The cached demo bundle for `cfg`, built (train, export, verify) when missing."""
    from emoq_serve.config import preset
    from emoq_serve.data import load_corpus
    from emoq_serve.model.stage2 import EmoQStage2
    from export.exporter import export_bundle
    from training import stage1, stage2

    root = demo_dir(cfg.key)
    bundle = root / "bundle"
    if bundle.exists() and not rebuild:
        return bundle
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    _step(f"building the demo bundle ({cfg.key}) in {root}")
    from emoq_serve.data.synthetic import resolve_piper_share

    share = resolve_piper_share()  # warns (and is 0) when Piper is not installed
    _step(f"synthesizing the spoken corpus ({cfg.clips_per_class} train clips per emotion; voices: "
          f"{share:.0%} Piper (neural), {1 - share:.0%} espeak-ng)")
    corpus = load_corpus(f"synthetic:{cfg.clips_per_class}", cfg.seed)
    model_cfg = preset(cfg.preset, labels=corpus.labels)
    model_cfg.audio.cache_dir = str(root / "features")
    _step(f"stage 1: EmoQ-Former with SupCon + focal loss ({len(corpus.train)} train / {len(corpus.dev)} dev)")
    s1 = stage1.train_stage1(
        model_cfg, stage1.train_config(cfg.preset, epochs=cfg.stage1_epochs, seed=cfg.seed), corpus, root / "stage1"
    )
    _step("stage 2: projector + LoRA LLM with the soft prompt")
    s2 = stage2.train_stage2(
        model_cfg, stage2.train_config(cfg.preset, epochs=cfg.stage2_epochs, seed=cfg.seed), corpus,
        root / "stage2", stage2.Stage2Options(stage1_dir=str(root / "stage1"), feature_cache=str(root / "features")),
    )
    best = EmoQStage2.load(root / "stage2" / "best")
    test_by_voice = _accuracy_by_voice(best, corpus.test)
    _step("export: ONNX encoders + merged LLM, verified against the PyTorch model (ORT + vLLM)")
    manifest = export_bundle(best, bundle)
    report = {
        "config": cfg.key,
        "labels": list(corpus.labels),
        "stage1_dev": s1["best_dev"],
        "stage2_dev": s2["best_dev"],
        "stage2_test": s2.get("test"),
        "stage2_test_by_voice": test_by_voice,
        "parity": manifest["parity"],
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2))
    for folder in ("stage1", "stage2", "features"):  # the bundle is all that serving needs
        shutil.rmtree(root / folder, ignore_errors=True)
    _step(f"built in {report['build_seconds']:.0f} s; held-out test accuracy {_test_accuracy(report)}")
    return bundle


def _accuracy_by_voice(model: Any, test: list[Example]) -> dict[str, dict[str, float]]:
    """WA/UA/WF1 of the trained stage-2 model on the test clips of each voice (piper, espeak)."""
    from emoq_serve.data.speech import PIPER_VOICE
    from emoq_serve.metrics import emotion_metrics
    from training.stage2 import predict

    out = {}
    for voice in ("piper", "espeak"):
        part = [ex for ex in test if (ex.speaker == PIPER_VOICE) == (voice == "piper")]
        if part:
            y_pred = predict(model, part, batch_size=8).argmax(-1)
            out[voice] = {**emotion_metrics([ex.label for ex in part], y_pred, len(model.cfg.labels)), "clips": len(part)}
    return out


def _test_accuracy(report: dict[str, Any]) -> str:
    test = report.get("stage2_test") or {}
    if "wa" not in test:
        return "n/a"
    voices = "; ".join(f"{voice} {m['wa']:.3f} ({m['clips']} clips)"
                       for voice, m in (report.get("stage2_test_by_voice") or {}).items())
    return f"{test['wa']:.3f} (UA {test['ua']:.3f})" + (f"; per voice: {voices}" if voices else "")


#: Length of the demo conversation streamed in VOICE_ACTIVITY mode.
CONVERSATION_SECONDS = 60.0


async def query_demo(bundle: Path, seed: int) -> tuple[list[tuple[Example, EmotionResult, float]], Conversation,
                                                        list[dict[str, Any]]]:
    """Serve `bundle` on 127.0.0.1 (with the server's ASR on), stream every demo utterance, then a
    one-minute conversation in VOICE_ACTIVITY mode without transcripts, stop cleanly.

    Returns (utterance, final result, client-side milliseconds) per demo utterance, the
    conversation and its timeline (one `result_row` per final segment result)."""
    from emoq_serve.client.api import EmotionClient
    from emoq_serve.client.conversation import result_row, stream_conversation
    from emoq_serve.data.conversation import make_conversation
    from emoq_serve.data.synthetic import demo_utterances
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.server.app import bundle_server
    from emoq_serve.server.config import ServerConfig

    conv = make_conversation(seconds=CONVERSATION_SECONDS, seed=seed, voices="auto")
    _step(f"generated a {CONVERSATION_SECONDS:.0f} s conversation: speakers taking turns, "
          + ", ".join(f"{name} in the {'Piper' if s['voice'] == 'piper-joe' else 'espeak-ng'} voice"
                      for name, s in conv.speakers.items()))
    _step(f"starting the gRPC server on the bundle {bundle}")
    rows, timeline = [], []
    async with bundle_server(bundle, runtime_preset("cpu"), ServerConfig(port=0, metrics_port=None)) as server:
        _step(f"streaming the demo utterances to 127.0.0.1:{server.port} (100 ms chunks)")
        async with EmotionClient(f"127.0.0.1:{server.port}") as client:
            for example in demo_utterances(seed):
                t0 = time.perf_counter()
                async for result in client.stream(example.audio, 16_000, example.transcript, chunk_ms=100):
                    if result.is_final:
                        rows.append((example, result, (time.perf_counter() - t0) * 1e3))
            # No client transcripts: the server's ASR supplies each segment's (source "asr").
            _step(f"streaming the conversation ({conv.duration_s:.0f} s, {len(conv.turns)} turns) in "
                  "VOICE_ACTIVITY mode, no transcripts sent: the server segments it and transcribes each segment")
            async for r, latency in stream_conversation(client, conv.audio, 16_000, chunk_ms=100, timeout=600):
                if r.is_final:
                    timeline.append(result_row("conversation", r, latency))
        _step("stopping the server (drain, then stop)")
    return rows, conv, timeline


def format_conversation(conv: Conversation, timeline: list[dict[str, Any]]) -> str:
    """The server's segments next to the generator's ground truth (the turn each overlaps most;
    turns no segment covered are listed as missed), and how many labels match the truth."""
    from emoq_serve.data.conversation import match_turn

    def cut(text: str, n: int = 38) -> str:
        return text if len(text) <= n else text[: n - 1] + "…"

    header = ["seg", "start", "end", "spk", "transcript (source)", "label", "prob", "|", "truth: start", "end", "spk",
              "label", "transcript"]
    body, matched = [], set()
    for r in timeline:
        t = match_turn(conv.turns, r["start_s"], r["end_s"])
        row = [str(r["segment_index"]), f"{r['start_s']:.2f}", f"{r['end_s']:.2f}", r["speaker"] or "-",
               f"{cut(r['transcript']) or '-'} ({r['transcript_source']})", r["label"], f"{r['probability']:.2f}", "|"]
        if t is None:
            row += ["(no turn: a false segment)", "", "", "", ""]
        else:
            matched.add(t.index)
            row += [f"{t.start_s:.2f}", f"{t.end_s:.2f}", t.speaker, t.label, cut(t.transcript)]
        body.append(row)
    for t in conv.turns:
        if t.index not in matched:
            body.append(["-", "", "", "", "(missed: no segment)", "", "", "|", f"{t.start_s:.2f}", f"{t.end_s:.2f}",
                         t.speaker, t.label, cut(t.transcript)])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [f"conversation timeline: the server's segments (speaker: what the client sent, none here) | the "
             "generator's ground truth (spk: " + ", ".join(f"{n} = {s['voice']}" for n, s in conv.speakers.items()) + ")"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]]
    right = sum(1 for r in timeline if (t := match_turn(conv.turns, r["start_s"], r["end_s"])) and r["label"] == t.label)
    lines.append(f"conversation: {len(timeline)} segment(s) for {len(conv.turns)} turn(s); labels matching the "
                 f"ground truth: {right}/{len(conv.turns)}; transcripts from "
                 + ", ".join(f"{src}: {n}" for src, n in sorted(Counter(r["transcript_source"] for r in timeline).items())))
    return "\n".join(lines)


def quiet_libraries() -> None:
    """Keep the demo's own steps readable: the libraries' start-up chatter (vLLM's per-weight
    dtype notes, the ONNX exporter's optional-op and axis-name notices, deprecation warnings)
    says nothing a newcomer can act on. Errors still show."""
    import torch._logging  # set_logs is torch's public switch; a plain setLevel is reset on export

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    torch._logging.set_logs(onnx=logging.ERROR)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", message=r"# The axis name")


def run(args: argparse.Namespace) -> int:
    from emoq_serve.client.cli import format_table

    quiet_libraries()

    started = time.perf_counter()
    cfg = DEMO_PRESETS["quick" if args.quick else DEMO_LLMS[args.llm]]
    bundle = build_demo_bundle(cfg, rebuild=args.rebuild)
    report = json.loads((bundle.parent / "report.json").read_text())
    results, conv, timeline = asyncio.run(query_demo(bundle, cfg.seed))
    labels = report["labels"]
    print()
    print(format_table([(f"{ex.id} ({ex.cue}): \"{ex.transcript}\"", r, ms) for ex, r, ms in results]))
    correct = sum(r.label == labels[ex.label] for ex, r, _ in results)
    print()
    print(f"demo utterances right: {correct}/{len(results)}; held-out synthetic test accuracy: {_test_accuracy(report)};"
          f" export parity: embeddings {report['parity']['embedding_max_abs']:.2e},"
          f" posteriors {report['parity']['posterior_max_abs']:.2e}")
    print()
    print(format_conversation(conv, timeline))
    print(f"demo finished in {time.perf_counter() - started:.0f} s (bundle: {bundle})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build (once) the demo bundle, serve it, and query it over gRPC")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo bundle")
    model = p.add_mutually_exclusive_group()  # --quick builds the tiny preset's own toy LLM
    model.add_argument("--quick", action="store_true", help="reduced-time mode (tiny preset; every stage still runs)")
    model.add_argument("--llm", choices=sorted(DEMO_LLMS), default="toy",
                   help="toy: the small preset's randomly initialised 4-layer LLM (the default, fastest build); "
                        "smollm2: the pretrained SmolLM2-135M-Instruct (see the README for its build time and accuracy)")
    p.set_defaults(func=run)
