"""The projector: pooled utterance vector z -> K soft tokens in the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """Linear-GELU-Linear. State-dict keys (`fc1.*`, `fc2.*`) are part of the bundle format."""

    def __init__(self, in_dim: int, llm_hidden: int, num_soft_tokens: int, hidden: int):
        super().__init__()
        self.num_soft_tokens = num_soft_tokens
        self.llm_hidden = llm_hidden
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_soft_tokens * llm_hidden)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], num_soft_tokens: int) -> Projector:
        """A projector of the shape `state` holds, with its weights (K is not in the shapes)."""
        hidden, in_dim = state["fc1.weight"].shape
        head = cls(in_dim, state["fc2.weight"].shape[0] // num_soft_tokens, num_soft_tokens, hidden)
        head.load_state_dict(state)
        return head

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B,D] -> soft prompt [B,K,H]."""
        return self.fc2(self.act(self.fc1(z))).view(z.shape[0], self.num_soft_tokens, self.llm_hidden)
