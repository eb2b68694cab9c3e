"""Eager activation checkpointing around a rewritten (gated) region.

A gate inside a checkpointed region is called twice per step: in the forward, and
again when backward recomputes the region. The controller answers the second call
with the decision of the first (it knows it is inside backward), so the recomputed
region drops exactly the branches the forward dropped.

A gate with ``recompute=True`` inside such a region does not checkpoint its branch a second time: the
region already recomputes it (:func:`inside_region` tells it so, in the forward and in the recompute alike,
so that both run the same ops and save the same tensors).
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.utils.checkpoint
from torch import nn

_REGIONS = threading.local()  # .depth: how many Checkpointed bodies are running in this thread


def inside_region() -> bool:
    """Is a :class:`Checkpointed` body running (its forward, or its recompute in backward)?"""
    return getattr(_REGIONS, "depth", 0) > 0


@contextlib.contextmanager
def _region():
    _REGIONS.depth = getattr(_REGIONS, "depth", 0) + 1
    try:
        yield
    finally:
        _REGIONS.depth -= 1


class Checkpointed(nn.Module):
    """Run ``body`` under non-reentrant ``torch.utils.checkpoint``, as the captured region did."""

    def __init__(self, body: nn.Module, kwargs: dict | None = None) -> None:
        super().__init__()
        self.body = body
        self.kwargs = {k: v for k, v in (kwargs or {}).items() if k in ("preserve_rng_state", "determinism_check")}

    def forward(self, *args):
        if not torch.is_grad_enabled():
            return self.body(*args)
        return torch.utils.checkpoint.checkpoint(self._run_body, *args, use_reentrant=False, **self.kwargs)

    def _run_body(self, *args):
        with _region():
            return self.body(*args)
