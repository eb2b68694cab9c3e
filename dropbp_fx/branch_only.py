"""No gradient, not a zero one, for a trunk parameter whose every gradient path this step's mask closed.

:mod:`dropbp_fx.passes.grad_paths` finds the trunk parameters whose gradient reaches them only through some gates'
branches (PEGASUS-X's ``embed_global``). When the mask closes all of those gates, eager autograd gives them no
gradient (``.grad`` stays ``None``, as for the closed branches' own parameters), but an AOT-compiled trunk
segment hands them zeros. Two public per-parameter hooks put that right:

* ``register_hook`` (before the gradient is accumulated) notes whether ``.grad`` was ``None`` until now, whether
  the mask of the step closes every one of the parameter's gates, and whether the incoming gradient is all
  zeros (a use of the parameter the graphs did not see, such as eager code between graphs, keeps its gradient);
* ``register_post_accumulate_grad_hook`` then sets ``.grad`` back to ``None`` when all three hold.

Gradient accumulation is kept: a parameter that had a gradient from an earlier micro-step keeps it.
A parameter that some graph reads on a path without gate is never touched (``None`` in the pass's finding).
"""

from __future__ import annotations

import weakref

import torch


class BranchOnlyGrads:
    """The branch-only trunk parameters of one :class:`~dropbp_fx.DropBP` and their gates' slots."""

    def __init__(self, controller) -> None:
        self.controller = controller
        self._slots: dict[int, frozenset[int]] = {}  # id(parameter) -> slots of the gates its paths enter
        self._excluded: set[int] = set()  # read by some graph outside every gate: never touched
        self._pending: set[int] = set()  # parameters whose zero gradient of this backward goes back to None
        self._handles: dict[int, list] = {}
        self.names: dict[str, frozenset[int]] = {}  # parameter name -> slots (for explain and the tests)
        self.reset_count = 0  # gradients put back to None so far

    def add(self, parameter: torch.nn.Parameter, name: str, slots: tuple[int, ...] | None) -> None:
        """Take in one graph's finding for ``parameter`` (``slots`` None: a path without gate)."""
        key = id(parameter)
        if key in self._excluded:
            return
        if slots is None:
            self._excluded.add(key)
            self._slots.pop(key, None)
            self.names.pop(name, None)
            for handle in self._handles.pop(key, ()):
                handle.remove()
            return
        self._slots[key] = self._slots.get(key, frozenset()) | frozenset(slots)
        self.names[name] = self._slots[key]
        if key not in self._handles:
            ref = weakref.ref(parameter)
            self._handles[key] = [parameter.register_hook(lambda grad, ref=ref: self._before(ref, grad)),
                                  parameter.register_post_accumulate_grad_hook(self._after)]

    def _before(self, ref, grad: torch.Tensor | None) -> None:
        parameter = ref()
        if parameter is None:
            return
        key = id(parameter)
        slots = self._slots.get(key)
        if (slots and parameter.grad is None and all(self.controller.closed(s) for s in slots)
                and (grad is None or not grad.any())):
            self._pending.add(key)
        else:
            self._pending.discard(key)

    def _after(self, parameter: torch.Tensor) -> None:
        if id(parameter) in self._pending:
            self._pending.discard(id(parameter))
            parameter.grad = None
            self.reset_count += 1
