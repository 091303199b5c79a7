"""`emoq eval` on a small MELD-format tree: report fields, counts, order of predictions, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from emoq_serve.cli import main
from emoq_serve.config import LABEL_SETS, preset
from emoq_serve.data import load_corpus
from emoq_serve.data.batching import collate
from emoq_serve.model.emoq import EmoQStage1
from training.evaluate import corpus_spec

_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
           "Season", "Episode", "StartTime", "EndTime"]
_TEXTS = ["Oh my God, he's lost it.", "What?", "Or, we could go to the bank.", "You're a genius!",
          "Get out!", "Ew.", "Help! Somebody help me, there is a spider in the bathtub!", "Okay.",
          "I can't believe you would do something like that to me after everything.", "Fine."]
_EMOTIONS = LABEL_SETS["meld7"]


def write_meld_split(path: Path, rows: int, offset: int) -> list[str]:
    """A MELD CSV with `rows` utterances cycling through texts and all 7 emotions; returns emotions."""
    emotions = []
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(_HEADER)
        for i in range(rows):
            emotion = _EMOTIONS[(i * 3 + offset) % len(_EMOTIONS)]
            emotions.append(emotion)
            w.writerow([i + 1, _TEXTS[i % len(_TEXTS)], "Ross", emotion, "neutral", i // 4, i % 4, 1, 1,
                        "00:00:01,000", "00:00:02,000"])
    return emotions


@pytest.fixture(scope="module")
def meld_tree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("meld")
    write_meld_split(root / "train_sent_emo.csv", 14, 0)
    return root, write_meld_split(root / "dev_sent_emo.csv", 23, 1)


@pytest.fixture(scope="module")
def meld7_run(tmp_path_factory) -> Path:
    """A run folder shaped like `emoq train stage1`'s (run/best = a tiny 7-class checkpoint)."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("run")
    EmoQStage1(preset("tiny", labels=_EMOTIONS)).save(run / "best")
    return run


def _eval(*args: str) -> int:
    return main(["eval", *args])


def test_eval_checkpoint_report_files_and_counts(meld_tree, meld7_run, tmp_path, capsys) -> None:
    root, dev_emotions = meld_tree
    out = tmp_path / "eval"
    assert _eval("--checkpoint", str(meld7_run), "--data", f"meld:{root}", "--classes", "7",
                 "--split", "dev", "--out", str(out), "--batch-size", "4") == 0
    report = json.loads((out / "eval_dev.json").read_text())
    assert report["labels"] == list(_EMOTIONS)
    assert report["num_examples"] == len(dev_emotions) == 23
    assert report["source"]["stage"] == 1 and report["source"]["checkpoint"] == str(meld7_run / "best")
    assert report["data"] == f"meld:{root}:7" and report["split"] == "dev"
    for key in ("wa", "ua", "wf1"):
        assert 0.0 <= report[key] <= 1.0
    matrix = np.asarray(report["confusion_matrix"])
    assert matrix.shape == (7, 7) and matrix.sum() == 23
    # Rows are the truth: their sums are the dev supports, which the fixture fixed.
    assert matrix.sum(axis=1).tolist() == [dev_emotions.count(e) for e in _EMOTIONS]
    assert [report["per_class"][e]["support"] for e in _EMOTIONS] == matrix.sum(axis=1).tolist()
    assert report["wa"] == pytest.approx(np.trace(matrix) / 23)
    for row in report["per_class"].values():
        assert set(row) == {"precision", "recall", "f1", "support"}
    png = (out / "confusion_dev.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    text = (out / "eval_dev.txt").read_text()
    assert "WF1" in text and "fear" in text and text.strip() in capsys.readouterr().out


def test_eval_predictions_keep_example_order(meld_tree, meld7_run, tmp_path) -> None:
    """Batches run in length order; the confusion matrix and the report's per-example rows must
    still pair each prediction with its own example. Recompute them example by example, unbatched."""
    root, _ = meld_tree
    out = tmp_path / "eval"
    _eval("--checkpoint", str(meld7_run / "best"), "--data", f"meld:{root}:7", "--out", str(out), "--batch-size", "5")
    report = json.loads((out / "eval_dev.json").read_text())
    model = EmoQStage1.load(meld7_run / "best").eval()
    expected, rows = np.zeros((7, 7), dtype=np.int64), []
    with torch.no_grad():
        for ex in load_corpus(f"meld:{root}:7").dev:
            batch = collate([ex], model.text_tokenizer, model.cfg.former.max_text_tokens)
            predicted = int(model(batch)[1].argmax(-1))
            expected[ex.label, predicted] += 1
            rows.append({"id": ex.id, "label": _EMOTIONS[ex.label], "predicted": _EMOTIONS[predicted]})
    assert report["confusion_matrix"] == expected.tolist()
    assert report["predictions"] == rows  # ids and labels in the split's order, each with its own prediction


def test_eval_refuses_mismatched_classes(meld_tree, meld7_run, tmp_path) -> None:
    root, _ = meld_tree
    with pytest.raises(ValueError, match="predicts"):
        _eval("--checkpoint", str(meld7_run), "--data", f"meld:{root}", "--classes", "4", "--out", str(tmp_path))


def test_corpus_spec() -> None:
    assert corpus_spec("meld:/d", 4) == "meld:/d:4"
    assert corpus_spec("meld:/d:7", None) == "meld:/d:7"
    with pytest.raises(ValueError, match="already names"):
        corpus_spec("meld:/d:7", 4)
    with pytest.raises(ValueError, match="meld:DIR only"):
        corpus_spec("synthetic", 7)


def test_eval_stage2_checkpoint(tiny_checkpoint, tmp_path) -> None:
    """A stage-2 checkpoint is scored by its LLM posteriors (synthetic corpus: the tiny labels)."""
    out = tmp_path / "eval"
    assert _eval("--checkpoint", str(tiny_checkpoint), "--data", "synthetic:2", "--split", "dev", "--out", str(out)) == 0
    report = json.loads((out / "eval_dev.json").read_text())
    assert report["source"]["stage"] == 2
    assert np.asarray(report["confusion_matrix"]).sum() == report["num_examples"] == len(load_corpus("synthetic:2").dev)


@pytest.mark.slow
def test_eval_bundle_matches_its_checkpoint(tiny_checkpoint, tiny_bundle, tmp_path) -> None:
    """Through the serving runtime (ORT + transformers LLM) the bundle gives the checkpoint's
    predictions; `--text-only` sends empty audio, which the runtime must accept."""
    reports = {}
    for name, flag, path in (("ckpt", "--checkpoint", tiny_checkpoint), ("bundle", "--bundle", tiny_bundle)):
        out = tmp_path / name
        _eval(flag, str(path), "--data", "synthetic:2", "--split", "dev", "--text-only", "--engine", "eager", "--out", str(out))
        reports[name] = json.loads((out / "eval_dev.json").read_text())
    assert reports["bundle"]["source"]["engine"] == "eager" and reports["bundle"]["text_only"]
    assert reports["bundle"]["confusion_matrix"] == reports["ckpt"]["confusion_matrix"]
