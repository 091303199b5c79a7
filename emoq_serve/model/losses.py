"""Stage-1 training objective: MAL = supervised contrastive + λ · class-weighted focal loss.

SupCon shapes the pooled embedding space (same emotion close, others apart), which is what the
stage-2 projector later reads; the focal term on the auxiliary head keeps minority classes from
being ignored on the imbalanced emotion corpora.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


#: Class-weighting schemes for the focal term (`TrainConfig.class_weighting`).
CLASS_WEIGHTING = ("inverse", "sqrt", "none")


def class_weights_from_labels(labels: Sequence[int] | torch.Tensor, num_classes: int,
                              scheme: str = "inverse") -> torch.Tensor:
    """Per-class weights from the training labels: "inverse" w_c = N / (C · n_c) (the paper's),
    "sqrt" its square root (milder on rare classes, which WF1 counts by frequency), "none" all 1.
    An absent class gets weight 0 (never inf)."""
    if scheme not in CLASS_WEIGHTING:
        raise ValueError(f"class weighting must be one of {', '.join(CLASS_WEIGHTING)}; got {scheme!r}")
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    weights = y.numel() / (num_classes * counts.clamp(min=1))
    weights = {"inverse": weights, "sqrt": weights.sqrt(), "none": torch.ones_like(weights)}[scheme]
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def supervised_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Khosla et al. L_out on (already L2-normalised) embeddings z [B,D].

    For each anchor i: mean over positives p (same label, p≠i) of −log softmax_{a≠i}(z_i·z_a/τ)[p];
    averaged over the anchors that have at least one positive, and 0 when none has (the zero still
    carries z's graph so `backward` works on any batch).
    """
    z = z.float()
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    num_pos = positives.sum(dim=1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return z.sum() * 0.0
    pos_log_prob = torch.where(positives, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_log_prob[has_pos] / num_pos[has_pos]
    return per_anchor.mean()


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Mean over the batch of −w_y · (1 − p_y)^γ · log p_y (plain mean, not weight-normalised)."""
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    if class_weights is not None:
        loss = loss * class_weights.to(loss.device)[labels]
    return loss.mean()


def mal_loss(
    z: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    temperature: float = 0.07,
    gamma: float = 2.0,
    lam: float = 1.0,
) -> torch.Tensor:
    """The paper's stage-1 loss: SupCon(z) + λ · Focal(logits)."""
    return supervised_contrastive_loss(z, labels, temperature) + lam * focal_loss(logits, labels, class_weights, gamma)
