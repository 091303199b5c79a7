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

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> AuxHead:
        """A head of the shape `state` holds, with its weights."""
        hidden, in_dim = state["net.0.weight"].shape
        head = cls(in_dim, hidden, state["net.3.weight"].shape[0])
        head.load_state_dict(state)
        return head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
