"""Emotion-recognition metrics as the SER literature reports them (WA, UA, WF1), via scikit-learn.

UA (unweighted accuracy) is the mean recall over the classes present in the reference; a class
that never occurs in y_true is left out rather than counted as recall 0, so a dev split that
lacks a rare class is not penalised for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support, recall_score


def emotion_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, num_classes: int) -> dict[str, float]:
    """{"wa": accuracy, "ua": mean per-class recall, "wf1": support-weighted F1}, all fractions."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        return {"wa": 0.0, "ua": 0.0, "wf1": 0.0}
    present = sorted(set(y_true.tolist()))
    return {
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "wf1": float(f1_score(y_true, y_pred, labels=list(range(num_classes)), average="weighted", zero_division=0)),
    }


def emotion_report(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1/support, the confusion matrix (rows = truth) and WA/UA/WF1.

    JSON-serialisable, so `emoq eval` can write it next to its text rendering (`format_report`).
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    classes = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0
    )
    return {
        "labels": list(labels),
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(labels)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        **emotion_metrics(y_true, y_pred, len(labels)),
    }


def format_report(report: dict[str, Any]) -> str:
    """A fixed-width text table of an `emotion_report` for terminals and logs."""
    labels = report["labels"]
    width = max(10, *(len(name) for name in labels))
    lines = [f"{'':{width}}  precision  recall     f1  support"]
    for name in labels:
        row = report["per_class"][name]
        lines.append(f"{name:{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    lines.append(f"WA {report['wa']:.4f}   UA {report['ua']:.4f}   WF1 {report['wf1']:.4f}")
    lines.append("confusion (rows = truth, columns = prediction):")
    lines.append(f"{'':{width}}  " + " ".join(f"{name[:6]:>6}" for name in labels))
    for name, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{name:{width}}  " + " ".join(f"{n:6d}" for n in row))
    return "\n".join(lines)


def _normalizer():
    global _NORMALIZER
    if _NORMALIZER is None:
        from whisper_normalizer.english import EnglishTextNormalizer  # lazy: loads its spelling table

        _NORMALIZER = EnglishTextNormalizer()
    return _NORMALIZER


_NORMALIZER = None


def normalize_words(text: str) -> list[str]:
    """The words WER compares: Whisper's English text normaliser (`whisper-normalizer`, the one
    the field scores English ASR with: lower case, punctuation out, contractions spelled out,
    spelled numbers as digits so "seven" = "7", British spellings American), split on spaces."""
    return _normalizer()(text).split()


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance in words (substitutions + deletions + insertions), by jiwer."""
    import jiwer

    if not reference:
        return len(hypothesis)
    out = jiwer.process_words(" ".join(reference), " ".join(hypothesis) if hypothesis else "")
    return out.substitutions + out.deletions + out.insertions


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER the field's way: jiwer's word edits summed over the clips, over the reference
    words summed, both sides through Whisper's English normaliser (`normalize_words`)."""
    import jiwer

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [" ".join(normalize_words(r)) for r in references]
    hyps = [" ".join(normalize_words(h)) for h in hypotheses]
    if not any(refs):
        raise ValueError("the references hold no words")
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]  # jiwer refuses empty references
    out = jiwer.process_words([r for r, _ in kept], [h for _, h in kept])
    extra = sum(len(h.split()) for r, h in zip(refs, hyps, strict=True) if not r)  # all insertions
    words = sum(len(r.split()) for r, _ in kept)
    return (out.substitutions + out.deletions + out.insertions + extra) / words
