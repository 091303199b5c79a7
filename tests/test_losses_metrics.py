"""Losses and metrics against values worked out by hand on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emoq_serve.metrics import emotion_metrics, emotion_report, format_report
from emoq_serve.model.losses import class_weights_from_labels, focal_loss, mal_loss, supervised_contrastive_loss


def test_class_weights_are_n_over_c_times_count():
    # N=6, C=3, counts (3, 2, 1) -> 6/9, 6/6, 6/3; a 4th absent class gets 0, not inf.
    w = class_weights_from_labels([0, 0, 0, 1, 1, 2], 3)
    assert torch.allclose(w, torch.tensor([6 / 9, 1.0, 2.0]))
    w4 = class_weights_from_labels([0, 0, 0, 1, 1, 2], 4)
    assert torch.allclose(w4, torch.tensor([6 / 12, 6 / 8, 6 / 4, 0.0]))
    sqrt = class_weights_from_labels([0, 0, 0, 1, 1, 2], 4, "sqrt")
    assert torch.allclose(sqrt, torch.tensor([6 / 12, 6 / 8, 6 / 4, 0.0]).sqrt())
    assert torch.equal(class_weights_from_labels([0, 0, 0, 1, 1, 2], 4, "none"), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="inverse, sqrt, none"):
        class_weights_from_labels([0, 1], 2, "log")


def test_focal_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p_y = 0.5 and 0.75
    labels = torch.tensor([0, 0])
    per = [-(0.5**2) * math.log(0.5), -(0.25**2) * math.log(0.75)]
    assert focal_loss(logits, labels).item() == pytest.approx(sum(per) / 2, rel=1e-6)
    w = torch.tensor([2.0, 1.0])
    assert focal_loss(logits, labels, w).item() == pytest.approx(sum(per), rel=1e-6)
    # gamma = 0 is cross-entropy.
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert focal_loss(logits, labels, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_supcon_by_hand():
    # Three unit vectors: a and b share a label; c is alone (no positive: not an anchor).
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    t = 0.5
    # anchor a: others b (sim 0), c (sim -1); positive b.
    la = -(0 / t - math.log(math.exp(0 / t) + math.exp(-1 / t)))
    # anchor b: others a (0), c (0); positive a.
    lb = -(0 / t - math.log(2.0))
    got = supervised_contrastive_loss(z, labels, temperature=t).item()
    assert got == pytest.approx((la + lb) / 2, rel=1e-6)


def test_supcon_without_positives_is_zero_with_a_graph():
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    loss = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None


def test_supcon_prefers_clustered_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    bad = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert supervised_contrastive_loss(good, labels) < supervised_contrastive_loss(bad, labels)


def test_mal_is_supcon_plus_lambda_focal():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    w = class_weights_from_labels(labels, 3)
    expected = supervised_contrastive_loss(z, labels, 0.1) + 0.5 * focal_loss(logits, labels, w, 1.5)
    got = mal_loss(z, logits, labels, w, temperature=0.1, gamma=1.5, lam=0.5)
    assert torch.allclose(got, expected)


def test_emotion_metrics_by_hand():
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 1]
    m = emotion_metrics(y_true, y_pred, 4)  # class 3 never occurs: left out of UA
    assert m["wa"] == pytest.approx(5 / 8)
    assert m["ua"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 2) / 3)
    # F1 per class: c0 P=3/4 R=3/4 -> .75; c1 P=1/3 R=1/2 -> .4; c2 P=1 R=1/2 -> 2/3.
    assert m["wf1"] == pytest.approx((4 * 0.75 + 2 * 0.4 + 2 * (2 / 3)) / 8)


def test_emotion_report_counts_and_text():
    labels = ("neutral", "angry", "sad")
    report = emotion_report(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), labels)
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert report["per_class"]["angry"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["wa"] == pytest.approx(0.75)
    text = format_report(report)
    assert "angry" in text and "WA 0.7500" in text
