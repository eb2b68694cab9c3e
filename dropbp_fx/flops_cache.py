"""Branch FLOPs from a graph's shapes, counted once per structure and input shapes (identical layers share
one count)."""

from __future__ import annotations

import torch.fx as fx

from dropbp_fx.inner import input_key
from dropbp_fx.shapes import concrete, node_value


class FlopsCache:
    def __init__(self) -> None:
        self._counts: dict[tuple, tuple[int, int]] = {}

    def of_gate(self, branch: fx.GraphModule, values) -> tuple[int, int]:
        """(forward, backward) FLOPs of a gated branch called with ``values`` (fake or real tensors)."""
        from dropbp_fx.passes.flops import count_flops
        from dropbp_fx.passes.graph_view import structure_key

        key = (structure_key(branch), input_key(values))
        if key not in self._counts:
            self._counts[key] = concrete(count_flops(branch, values))
        return self._counts[key]

    def of_branch(self, gm: fx.GraphModule, branch) -> int:
        """Backward FLOPs of a branch not gated yet (to choose a nest's level), from the graph's shapes; its
        parameter elements where the graph has none."""
        from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

        sub_gm, inputs, _ = fuse_as_graphmodule(gm, branch.nodes, "Nested", dict.fromkeys(branch.nodes))
        values = [node_value(n) for n in inputs]
        if any(v is None for v in values):
            return branch.weight
        return self.of_gate(sub_gm, values)[1]
