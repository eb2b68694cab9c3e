"""The independent oracle: the original module, run eagerly, with chosen submodules' outputs detached.

What DropBP should give, computed without DropBP: run the plain model eagerly inside :func:`detached` (forward
hooks that ``.detach()`` the outputs of the branches you name), call ``backward``, and compare :func:`grads`
with those of the compiled step that dropped the same branches (:func:`assert_same_grads`)::

    from dropbp_fx.testing import assert_same_grads, detached, grads

    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    compiled = torch.compile(model, backend=dbp)
    compiled(x).sum().backward()
    got = grads(model)
    dropped = [gate for gate, closed in dbp.last_mask.items() if closed]  # a one-module gate: its path
    model.zero_grad(set_to_none=True)
    with detached(model, dropped):
        model(x).sum().backward()
    assert_same_grads(got, grads(model))

Independent of the code under test, so that it can judge it: this module imports only torch, never the rest of
dropbp_fx nor its passes (no backend, pipeline, tracing or graph analysis; ``tests/test_layout.py`` checks
this). Importing it as ``dropbp_fx.testing`` loads the package, but nothing here reads or calls it.
The project's tests and benchmarks check the backend against it, and so can a user, on their own model.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


def _detach(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def detached(model: nn.Module, module_paths, through_constants: bool = False):
    """Forward hooks that ``.detach()`` every tensor output of the modules at ``module_paths``.

    An entry ``(path, k)`` detaches only the ``k``-th call (from 0) of that module in each forward: a layer
    module run several times per forward (ALBERT's shared layer, a recurrent block) has a gate per call.
    ``(path, k, j)`` detaches only the ``j``-th tensor output of that call (a module whose outputs feed two
    residual streams).

    ``through_constants``: the branch goes on through the ops that read only its values and the model's
    constants broadcast onto them (a bias, a scale: ``(f(x) + b) * s`` before the add with the skip, in a
    module that also takes the skip); those run on detached inputs, so their parameters get no gradient. So does
    the difference ``f - h`` of a branch value and another value of its shape, the interpolating residual
    ``h + a * (f(h) - h)`` (nGPT, Dory): the closed term is ``a * (f(h) - h)``, and the skip ``h`` keeps the
    identity gradient (docs/residuals.md).
    """
    mode = _BranchOps(model) if through_constants and module_paths else None
    which: dict[str, set | None] = {}  # path -> the (call, output) pairs to detach (None: all of every call)
    for entry in module_paths:
        path, *where = (entry,) if isinstance(entry, str) else entry
        pair = (where[0], where[1] if len(where) > 1 else None) if where else None
        which[path] = None if pair is None or which.get(path, set()) is None else which.get(path, set()) | {pair}
    calls: dict[str, int] = {}

    def hook(path, mod, args, out):
        call = calls[path] = calls.get(path, -1) + 1
        chosen = which[path]
        if chosen is not None and not any(c == call for c, _ in chosen):
            return out
        outputs = None if chosen is None else {o for c, o in chosen if c == call}
        if outputs is not None and None not in outputs:  # only those tensor outputs (in flattened order)
            flat, spec = tree_flatten(out)
            tensors = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
            picked = {tensors[o] for o in outputs}
            out = tree_unflatten([_detach(v) if i in picked else v for i, v in enumerate(flat)], spec)
            if mode is not None:
                mode.mark([flat[i] for i in picked])
            return out
        out = tree_map(_detach, out)
        if mode is not None:
            mode.mark(out)
        return out

    handles = [model.get_submodule(p).register_forward_hook(functools.partial(hook, p)) for p in which]
    try:
        with mode if mode is not None else contextlib.nullcontext():
            yield
    finally:
        for h in handles:
            h.remove()


class _BranchOps(TorchFunctionMode):
    """Runs an op on detached inputs when it reads a branch value and, besides, only constants (parameters,
    buffers and values made from them alone) with fewer elements than that value, or when it subtracts another
    value of the same shape from it (``f(h) - h``: an interpolating residual's term); its result is a branch value
    too. Any other op runs as it is, and a value it writes in place stops being a branch value."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.branch: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive: ids stay unique)
        self.constants: dict[int, torch.Tensor] = {id(t): t for t in (*model.parameters(), *model.buffers())}

    def mark(self, value, table=None) -> None:
        table = self.branch if table is None else table
        for t in tree_flatten(value)[0]:
            if isinstance(t, torch.Tensor):
                table[id(t)] = t

    def _difference(self, func, args, kwargs) -> bool:
        """``v - h``: a branch value minus another tensor of its shape, nothing else."""
        name = getattr(func, "__name__", "")
        return (name in ("sub", "__sub__") and len(args) == 2 and not kwargs
                and all(isinstance(t, torch.Tensor) for t in args) and id(args[0]) in self.branch
                and id(args[1]) not in self.branch and args[0].shape == args[1].shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        branch = [t for t in tensors if id(t) in self.branch]
        if branch:
            size = max(t.numel() for t in branch)
            if all(id(t) in self.branch or (id(t) in self.constants and t.numel() < size) for t in tensors) \
                    or self._difference(func, args, kwargs):
                out = func(*tree_map(_detach, args), **tree_map(_detach, kwargs))
                self.mark(out)
                return out
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and (
                name.endswith("_") and not name.endswith("__") or name.startswith("__i") or name == "__setitem__"):
            self.branch.pop(id(args[0]), None)  # written in place by a non-branch op
            self.constants.pop(id(args[0]), None)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.branch.pop(id(t), None)
        if all(id(t) in self.constants for t in tensors):  # ``W.T``, ``1 + w``, ``torch.tensor(0.5)``
            self.mark(out, self.constants)
        return out


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
