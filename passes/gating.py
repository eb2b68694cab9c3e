"""Rewrite residual branches into gated drop-backward calls.

Before (one branch found by :func:`passes.residuals.find_residual_branches`)::

    %norm   = rms_norm(%x, %w_norm)
    %q      = linear(%norm, %w_q)
    ...
    %o      = linear(%attn, %w_o)
    %add    = add(%x, %o)

After::

    %gate   = call_module[dropbp_gate_0](%x, %w_norm, %w_q, ..., %w_o)   # DropGate(branch)
    %o      = getitem(%gate, 0)
    %add    = add(%x, %o)

The branch's nodes move into a ``GraphModule`` owned by the gate (``dropbp_gate_0.branch``);
its inputs are the nodes it read (stream, parameters, masks, rotary tables); its
outputs are the branch value first and then any side outputs (KV-cache tensors that
the graph returns). The add and everything else stay as they were, so the forward
value is unchanged; the gate decides, per step, whether the branch runs with autograd.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.tools_common import stable_topological_sort
from torch.fx.passes.utils.fuser_utils import fuse_as_graphmodule

from dropbp_fx.gate import DropGate
from passes.residuals import ResidualBranch, find_residual_branches


def gate_residual_branches(gm: fx.GraphModule, branches: list[ResidualBranch], controller) -> fx.GraphModule:
    """Move each branch into a :class:`DropGate` submodule registered with ``controller``; returns ``gm``."""
    for branch in branches:
        _gate_one(gm, branch, controller)
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _gate_one(gm: fx.GraphModule, branch: ResidualBranch, controller) -> None:
    members = set(branch.nodes)
    sub_gm, inputs, outputs = fuse_as_graphmodule(gm, branch.nodes, "ResidualBranch", dict.fromkeys(branch.nodes),
                                                  always_return_tuple=True)
    # The branch value first, then side outputs, in graph order.
    order = [branch.output] + [o for o in outputs if o is not branch.output]
    if order != list(outputs):
        out_node = sub_gm.graph.output_node()
        position = {o: i for i, o in enumerate(outputs)}
        out_node.args = (tuple(out_node.args[0][position[o]] for o in order),)
        sub_gm.recompile()
    attr = _free_attr(gm, "dropbp_gate")
    gm.add_submodule(attr, DropGate(sub_gm, branch.name, controller))

    with gm.graph.inserting_after(branch.nodes[-1]):
        call = gm.graph.call_module(attr, args=tuple(inputs))
    call.meta["dropbp_gate"] = branch.name
    for key in ("example_value", "val"):
        if all(key in o.meta for o in order):
            call.meta[key] = tuple(o.meta[key] for o in order)
    if "nn_module_stack" in branch.add.meta:
        call.meta["nn_module_stack"] = dict(branch.add.meta["nn_module_stack"])

    previous = call
    for i, old in enumerate(order):
        with gm.graph.inserting_after(previous):
            item = gm.graph.call_function(operator.getitem, (call, i))
        item.meta = dict(old.meta)
        old.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        previous = item
    for node in reversed(branch.nodes):
        gm.graph.erase_node(node)


def _free_attr(gm: fx.GraphModule, prefix: str) -> str:
    index = 0
    while hasattr(gm, f"{prefix}_{index}"):
        index += 1
    return f"{prefix}_{index}"


class GateResidualBranches(PassBase):
    """Pass form of find + gate, for a ``torch.fx.passes.infra.pass_manager.PassManager``."""

    def __init__(self, controller) -> None:
        super().__init__()
        self.controller = controller
        self.analysis = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.analysis = find_residual_branches(graph_module)
        gate_residual_branches(graph_module, self.analysis.branches, self.controller)
        return PassResult(graph_module, bool(self.analysis.branches))
