"""Projection heads: the intra-modal (equivariant) and inter-modal (invariant) MLPs."""

from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """in -> hidden -> hidden -> out, a LayerNorm after each Linear and ReLU after the first two.

    Module names (fc1, norm1, fc2, norm2, fc3, norm3) are the original's.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 512) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)
        self.norm3 = nn.LayerNorm(out_dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.norm2(self.fc2(x)))
        return self.norm3(self.fc3(x))
