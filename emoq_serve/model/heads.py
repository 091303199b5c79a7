"""Stage-1 auxiliary classifier on the pooled embedding (the focal half of the MAL loss)."""

from __future__ import annotations

import torch
from torch import nn


class AuxHead(nn.Module):
    """z [B,D] -> logits [B,C] through one hidden layer (Linear-GELU-Dropout-Linear)."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
