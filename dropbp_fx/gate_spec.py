"""What a gate is (:class:`GateSpec`, decided when its graph is rewritten), what it has done (:class:`GateState`,
the controller's record of it), and each gate's share of the backward FLOPs (:func:`flops_shares`).

The pipeline (:mod:`dropbp_fx.pipeline`) returns one ``GateSpec`` per gate it built; the backend registers each
once (``controller.register(spec) -> slot``) and hands the slot to the gate module, which holds nothing else
about the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class GateSpec:
    """Everything a gate is, from the rewrite of its graph."""

    name: str
    params: frozenset[str] = frozenset()  # names (in the model) of the parameters its branch consumes
    flops: tuple[int, int] | None = None  # (forward, backward) FLOPs of the branch; None: no shapes to count on
    weight: int = 0  # parameter elements its branch's compute uses
    side_outputs: int = 0  # values it returns besides the branch output (KV-cache tensors)


@dataclass
class GateState:
    """Everything about one gate, in one place (``controller.gates[slot]``): its spec's facts, its rate and its
    counts. The ``DropGate`` module holds its slot only."""

    name: str
    rate: float
    calls: int = 0  # training-mode calls
    drops: int = 0  # of which closed
    flops: tuple[int, int] | None = None  # (forward, backward) FLOPs of the branch, counted on the graph
    params: set[str] = field(default_factory=set)  # names of the parameters the branch consumes
    weight: int = 0  # parameter elements of the branch
    side_outputs: int = 0  # values the gate returns besides the branch output

    def update(self, spec: GateSpec) -> None:
        """Take in a spec of this gate (a graph recompiled, another graph holding the same gate): parameters
        add up, a FLOPs count replaces the previous one, the other facts are the latest graph's."""
        self.params.update(spec.params)
        if spec.flops is not None:
            self.flops = spec.flops
        self.weight, self.side_outputs = spec.weight, spec.side_outputs


def flops_shares(gates: Sequence[GateState]) -> tuple[str, list[float]]:
    """Each gate's share of the gates' backward FLOPs, and what the shares are of (``"bwd FLOPs share"``).

    Where a gate has no FLOPs count (a graph traced without shapes), parameter elements stand in for every gate:
    ``("params share", ...)``. ``DropBP.summary()``, ``explain`` and the callbacks' logs all read shares here.
    """
    if all(g.flops for g in gates):
        label, costs = "bwd FLOPs share", [g.flops[1] for g in gates]
    else:
        label, costs = "params share", [g.weight for g in gates]
    total = sum(costs) or 1
    return label, [c / total for c in costs]
