"""Emotion-recognition metrics as the SER literature reports them (WA, UA, WF1), via scikit-learn.

UA (unweighted accuracy) is the mean recall over the classes present in the reference; a class
that never occurs in y_true is left out rather than counted as recall 0, so a dev split that
lacks a rare class is not penalised for it.
"""

from __future__ import annotations

import re
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


#: Contractions spelled out before scoring (as Whisper's English normaliser does), so "I'm" for
#: "I am" is not counted as two errors.
_CONTRACTIONS = {"i'm": "i am", "it's": "it is", "that's": "that is", "we're": "we are", "they're": "they are",
                 "you're": "you are", "he's": "he is", "she's": "she is", "don't": "do not", "can't": "can not",
                 "won't": "will not", "i've": "i have", "i'll": "i will", "let's": "let us"}


def normalize_words(text: str) -> list[str]:
    """Lower-case words without punctuation, contractions spelled out, for word error rates."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ").replace("\u2019", "'")).split()
    return " ".join(_CONTRACTIONS.get(w, w) for w in words).split()


def word_edits(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance in words (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_word != hyp_word))
    return row[-1]


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: total word edits over total reference words, after `normalize_words`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalize_words(r) for r in references]
    words = sum(len(r) for r in refs)
    if words == 0:
        raise ValueError("the references hold no words")
    return sum(word_edits(r, normalize_words(h)) for r, h in zip(refs, hypotheses, strict=True)) / words
