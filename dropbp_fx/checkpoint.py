"""Eager activation checkpointing around a rewritten (gated) region.

A gate inside a checkpointed region is called twice per step: in the forward, and
again when backward recomputes the region. The controller answers the second call
with the decision of the first (it knows it is inside backward), so the recomputed
region drops exactly the branches the forward dropped.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn


class Checkpointed(nn.Module):
    """Run ``body`` under non-reentrant ``torch.utils.checkpoint``, as the captured region did."""

    def __init__(self, body: nn.Module, kwargs: dict | None = None) -> None:
        super().__init__()
        self.body = body
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k in ("preserve_rng_state", "determinism_check")}

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.body(*args)
        return torch.utils.checkpoint.checkpoint(self.body, *args, use_reentrant=False, **self.kwargs)
