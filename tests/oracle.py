"""The independent oracle: the original module, run eagerly, with chosen submodules' outputs detached.

Nothing here imports dropbp_fx or passes: the reference gradients come from plain PyTorch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils._pytree import tree_map


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def detached(model: nn.Module, module_paths):
    """Forward hooks that ``.detach()`` every tensor output of the modules at ``module_paths``."""
    handles = [model.get_submodule(p).register_forward_hook(lambda mod, args, out: tree_map(_detach, out))
               for p in module_paths]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Parameter name -> a copy of its ``.grad`` (``None`` when it got no gradient)."""
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_grads(actual: dict, expected: dict, rtol=1e-5, atol=1e-6) -> None:
    """Equal gradients, and ``None`` exactly where the oracle has ``None``."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        assert (a is None) == (e is None), f"{name}: grad is {'None' if a is None else 'set'}, oracle " \
                                           f"{'None' if e is None else 'set'}"
        if e is not None:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
