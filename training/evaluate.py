"""`emoq eval`: score a trained checkpoint or an exported bundle on one split of a corpus.

    emoq eval --checkpoint runs/meld_text7 --data meld:/data/meld --classes 7 --split dev --out eval/
    emoq eval --bundle bundles/small --data synthetic --split test --text-only

Prints WA/UA/WF1, per-class precision/recall/F1 and the confusion matrix; with `--out` it also
writes `eval_<split>.json` (the `emoq_serve.metrics.emotion_report`, provenance and each
example's predicted label),
`eval_<split>.txt` and `confusion_<split>.png`. A checkpoint is scored with the PyTorch model
(stage 1: the auxiliary head's argmax; stage 2: the LLM's emotion posteriors); a bundle through
the serving runtime, so the figures are what `emoq serve` would answer.

`--text-only` drops the audio of every example: the paper's text ablation, and the only
setting for corpora without clips (MELD transcripts), where it changes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")


def corpus_spec(data: str, classes: int | None) -> str:
    """`--data` with `--classes` appended (`meld:DIR` + 7 -> `meld:DIR:7`); refuses a spec that
    already names a class count or a fold, since the two would silently disagree."""
    if classes is None:
        return data
    kind, _, rest = data.partition(":")
    if kind != "meld":
        raise ValueError(f"--classes applies to meld:DIR only; got --data {data!r}")
    if rest.rpartition(":")[2].isdigit():
        raise ValueError(f"--data {data!r} already names a class count; drop --classes or the suffix")
    return f"{data}:{classes}"


def checkpoint_predictions(path: str, examples: list[Any], labels: tuple[str, ...], batch_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Predicted class per example (in order) from a stage-1 or stage-2 checkpoint or run folder."""
    import torch

    from emoq_serve.model.emoq import EmoQStage1, checkpoint_folder, read_checkpoint_config
    from emoq_serve.model.stage2 import EmoQStage2
    from training import stage1, stage2

    folder = checkpoint_folder(path)  # accepts a run folder (-> best/) or a checkpoint
    cfg, stage = read_checkpoint_config(folder)
    _check_labels(tuple(cfg.labels), labels, folder)
    if stage == 1:
        model = EmoQStage1.load(folder).eval()
        y_pred = np.zeros(len(examples), dtype=np.int64)
        with torch.no_grad():
            for batch in stage1.iterate_batches(examples, model, batch_size):
                y_pred[batch["index"].numpy()] = model(batch)[1].argmax(-1).numpy()
    else:
        model = EmoQStage2.load(folder)
        y_pred = stage2.predict(model, examples, batch_size).argmax(-1)
    return y_pred, {"checkpoint": str(folder), "stage": stage, "preset": cfg.preset}


def bundle_predictions(path: str, examples: list[Any], labels: tuple[str, ...], batch_size: int, engine: str,
                       runtime: str = "test", precision: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Predicted class per example through the serving runtime (`load_recognizer`); `precision`
    overrides the preset's graph precision as `emoq serve --precision` does."""
    import asyncio

    from emoq_serve.executors import load_recognizer
    from emoq_serve.executors.config import runtime_preset
    from emoq_serve.executors.types import Utterance

    cfg = runtime_preset(runtime).replace(max_batch=batch_size)
    if precision:  # the preset's graph runtime may be onnxruntime, which has no reduced precision
        cfg = cfg.replace(graph_precision=precision, graph_runtime="auto")
    recognizer = load_recognizer(path, cfg, engine=engine)
    _check_labels(tuple(recognizer.labels), labels, path)
    utterances = [
        Utterance(audio=np.zeros(0, np.float32) if e.audio is None else e.audio, transcript=e.transcript, speaker=e.speaker,
                  context=e.context)
        for e in examples
    ]

    async def run_all() -> list[np.ndarray]:
        try:
            rows = []
            for i in range(0, len(utterances), batch_size):
                rows += [p.probabilities for p in await recognizer.recognize(utterances[i:i + batch_size])]
            return rows
        finally:
            await recognizer.close()

    rows = asyncio.run(run_all())
    y_pred = np.asarray([int(np.argmax(r)) for r in rows], dtype=np.int64)
    return y_pred, {"bundle": str(path), "engine": engine, **recognizer.info()}


def _check_labels(model_labels: tuple[str, ...], corpus_labels: tuple[str, ...], where: object) -> None:
    if model_labels != corpus_labels:
        raise ValueError(f"{where} predicts {list(model_labels)} but the corpus has {list(corpus_labels)} "
                         "(pick the matching --classes / --data)")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Score the model named by the flags; returns the JSON report (also written under --out)."""
    from emoq_serve.data import load_corpus
    from emoq_serve.metrics import emotion_report, format_report

    spec = corpus_spec(args.data, args.classes)
    corpus = load_corpus(spec)
    examples = corpus.splits()[args.split]
    if not examples:
        raise ValueError(f"split {args.split!r} of {spec} is empty")
    if args.text_only:
        examples = [dataclasses.replace(e, audio=None) for e in examples]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.checkpoint:
        y_pred, source = checkpoint_predictions(args.checkpoint, examples, corpus.labels, args.batch_size)
    else:
        y_pred, source = bundle_predictions(args.bundle, examples, corpus.labels, args.batch_size, args.engine,
                                            args.runtime, args.precision)
    seconds = time.perf_counter() - started
    y_true = np.asarray([e.label for e in examples], dtype=np.int64)
    report = {
        "source": source,
        "data": spec,
        "split": args.split,
        "text_only": bool(args.text_only),
        "num_examples": len(examples),
        "seconds": round(seconds, 3),
        **emotion_report(y_true, y_pred, corpus.labels),
        # Example by example, so two sources (a checkpoint and its bundle) compare row by row.
        "predictions": [{"id": e.id, "label": corpus.labels[e.label], "predicted": corpus.labels[int(p)]}
                        for e, p in zip(examples, y_pred, strict=True)],
    }
    text = format_report(report)
    print(text)
    if args.out:
        from training.plots import plot_confusion

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"eval_{args.split}.json").write_text(json.dumps(report, indent=2))
        (out / f"eval_{args.split}.txt").write_text(text + "\n")
        title = f"{Path(args.checkpoint or args.bundle).name} on {args.split} (WF1 {report['wf1']:.3f})"
        plot_confusion(report["confusion_matrix"], corpus.labels, out / f"confusion_{args.split}.png", title)
        log.info("wrote %s", out / f"eval_{args.split}.json")
    return report


def _run(args: argparse.Namespace) -> int:
    evaluate(args)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `emoq eval` (heavy imports stay inside `_run`: every `emoq` call builds this parser)."""
    p = subparsers.add_parser("eval", help="WA/UA/WF1, per-class scores and a confusion matrix on a split")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="stage-1/stage-2 checkpoint, or a run folder (uses best/)")
    source.add_argument("--bundle", help="exported bundle folder (scored through the serving runtime)")
    p.add_argument("--data", required=True, help="synthetic[:N] | iemocap:DIR[:fold] | meld:DIR[:4|7]")
    p.add_argument("--classes", type=int, choices=[4, 7], help="MELD class count (appended to --data meld:DIR)")
    p.add_argument("--split", choices=SPLITS, default="dev")
    p.add_argument("--out", help="folder for eval_<split>.json/.txt and confusion_<split>.png")
    p.add_argument("--text-only", action="store_true", help="drop the audio of every example (text ablation)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--engine", choices=["onnx", "eager"], default="onnx", help="bundle engine")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--runtime", choices=["test", "cpu", "cuda"], default="test",
                   help="bundle runtime preset: test = exact fp32; cpu = what `emoq serve` runs here "
                        "(bf16 graphs and LLM on CPUs with native bf16)")
    p.add_argument("--precision", choices=["float32", "bfloat16", "int8"],
                   help="bundle: the graphs' precision, as `emoq serve --precision` (int8: the bundle's int8 variant)")
    p.set_defaults(func=_run)
