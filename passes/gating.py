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

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.tools_common import stable_topological_sort

from dropbp_fx.gate import DropGate
from passes.dead_code import remove_dead_code
from passes.outline import outline
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
    call = outline(gm, branch.nodes, lambda sub_gm: DropGate(sub_gm, branch.name, controller), "dropbp_gate",
                   first=branch.output, class_name="ResidualBranch")
    call.meta["dropbp_gate"] = branch.name
    if branch.stream is not None:  # which argument is the residual stream (for passes.instrument)
        call.meta["dropbp_stream_arg"] = call.args.index(branch.stream)
    if "nn_module_stack" in branch.add.meta:
        call.meta["nn_module_stack"] = dict(branch.add.meta["nn_module_stack"])


class GateResidualBranches(PassBase):
    """Pass form of find + gate, for a ``torch.fx.passes.infra.pass_manager.PassManager``."""

    def __init__(self, controller) -> None:
        super().__init__()
        self.controller = controller
        self.analysis = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        remove_dead_code(graph_module)
        self.analysis = find_residual_branches(graph_module)
        gate_residual_branches(graph_module, self.analysis.branches, self.controller)
        return PassResult(graph_module, bool(self.analysis.branches))
