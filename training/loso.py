"""The paper's IEMOCAP protocol in one command: five leave-one-session-out folds, in turn.

    emoq train loso --data iemocap:/data/IEMOCAP --preset paper --out runs/iemocap_loso

Fold k tests on Session k (its two speakers unseen) and selects on a dev set carved from the
other four sessions by dialog (`emoq_serve.data.iemocap`). Each fold trains stage 1, then (with
`--stages 2`, the default) stage 2 on it, exactly as `emoq train stage1|stage2` would, into
OUT/fold{k}/stage1 and OUT/fold{k}/stage2. The best dev checkpoint's test-session WA/UA/WF1 are
reported per fold and as mean ± std over the folds (population std, as LOSO papers report) in
OUT/loso.json. A fold whose OUT/fold{k}/fold.json exists is read back, not trained again, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from emoq_serve.config import preset
from emoq_serve.data import path_and_number
from emoq_serve.data.iemocap import NUM_SESSIONS, load_iemocap
from training.common import flag_overrides

log = logging.getLogger(__name__)

METRICS = ("wa", "ua", "wf1")


def run_fold(data_dir: str | Path, fold: int, out: Path, preset_name: str, stages: int,
             overrides: dict[str, Any], feature_cache: str | None = None) -> dict[str, Any]:
    """Train fold `fold` (stage 1, then stage 2 when `stages` is 2); its dev and test figures."""
    from training import stage1, stage2

    corpus = load_iemocap(data_dir, fold)
    model_cfg = preset(preset_name, labels=corpus.labels)
    model_cfg.audio.cache_dir = feature_cache  # frozen HuBERT features: one pass serves every fold
    summary = stage1.train_stage1(model_cfg, stage1.train_config(preset_name, **overrides), corpus, out / "stage1")
    if stages == 2:
        opts = stage2.Stage2Options(stage1_dir=str(out / "stage1"), feature_cache=feature_cache)
        summary = stage2.train_stage2(model_cfg, stage2.train_config(preset_name, **overrides), corpus,
                                      out / "stage2", opts)
    return {"fold": fold, "test_session": f"Session{fold}", "stages": stages,
            "train_examples": len(corpus.train), "dev_examples": len(corpus.dev), "test_examples": len(corpus.test),
            "best_epoch": summary["best_epoch"], "dev": summary["best_dev"],
            "test": {m: summary["test"][m] for m in METRICS}, "seconds": summary["seconds"]}


def summarise(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and population std over the folds of each test metric."""
    table = {m: np.array([f["test"][m] for f in folds], dtype=np.float64) for m in METRICS}
    return {"folds": folds, "mean": {m: float(v.mean()) for m, v in table.items()},
            "std": {m: float(v.std()) for m, v in table.items()}}


def run_loso(data_dir: str | Path, out_dir: str | Path, preset_name: str, stages: int = 2,
             folds: tuple[int, ...] = tuple(range(1, NUM_SESSIONS + 1)), feature_cache: str | None = None,
             **overrides: Any) -> dict[str, Any]:
    """Every fold in turn (or read back when done), then the report; writes OUT/loso.json."""
    if stages not in (1, 2):
        raise ValueError(f"stages must be 1 or 2; got {stages}")
    out = Path(out_dir)
    records = []
    for fold in folds:
        done = out / f"fold{fold}" / "fold.json"
        if done.is_file():
            log.info("fold %d: done before, read from %s", fold, done)
            records.append(json.loads(done.read_text()))
            continue
        record = run_fold(data_dir, fold, out / f"fold{fold}", preset_name, stages, overrides, feature_cache)
        done.write_text(json.dumps(record, indent=2))
        records.append(record)
    report = {"preset": preset_name, "stages": stages, "data": str(data_dir), **summarise(records)}
    (out / "loso.json").write_text(json.dumps(report, indent=2))
    return report


def format_loso(report: dict[str, Any]) -> str:
    lines = [f"{'fold':<6}{'test':<10}" + "".join(f"{m.upper():>8}" for m in METRICS)]
    for f in report["folds"]:
        lines.append(f"{f['fold']:<6}{f['test_session']:<10}" + "".join(f"{100 * f['test'][m]:8.1f}" for m in METRICS))
    lines.append(f"{'mean':<16}" + "".join(f"{100 * report['mean'][m]:8.1f}" for m in METRICS))
    lines.append(f"{'± std':<16}" + "".join(f"{100 * report['std'][m]:8.1f}" for m in METRICS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """`emoq train loso`: the five folds of the IEMOCAP folder in `--data iemocap:DIR`."""
    kind, _, rest = args.data.partition(":")
    path, fold = path_and_number(rest)
    if kind != "iemocap" or not path or fold is not None:
        raise SystemExit(f"--data must be iemocap:DIR (every fold is run; no :FOLD); got {args.data!r}")
    overrides = {k: v for k, v in flag_overrides(args).items() if v is not None}
    report = run_loso(path, args.out, args.preset, args.stages, tuple(args.folds), args.feature_cache, **overrides)
    print(format_loso(report))
    return 0
