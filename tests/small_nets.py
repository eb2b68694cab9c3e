"""A small residual regressor shared by the framework tests (Lightning, accelerate): three pre-norm MLP branches."""

from __future__ import annotations

import torch
from torch import nn

D = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Regressor(nn.Module):
    """``x (n, 4) -> y (n,)``; its gates are ``blocks.{0,1,2}.mlp``."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, D)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(D, 1)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).squeeze(-1)


def regression_data(n: int = 256, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return torch.utils.data.TensorDataset(x, torch.sin(x).sum(-1))
