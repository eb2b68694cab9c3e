"""Rewrite residual branches into gated drop-backward calls.

Before (one branch found by :func:`dropbp_fx.passes.residuals.find_residual_branches`)::

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

from collections.abc import Callable

import torch.fx as fx
from torch import nn
from torch.fx.passes.tools_common import stable_topological_sort

from .outline import outline
from .residuals import ResidualBranch

GateFactory = Callable[[fx.GraphModule, ResidualBranch], nn.Module]


def gate_residual_branches(gm: fx.GraphModule, branches: list[ResidualBranch], make_gate: GateFactory) -> fx.GraphModule:
    """Move each branch into the module ``make_gate(branch_gm, branch)`` returns (the runtime's ``DropGate``);
    returns ``gm``."""
    for branch in branches:
        _gate_one(gm, branch, make_gate)
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _gate_one(gm: fx.GraphModule, branch: ResidualBranch, make_gate: GateFactory) -> None:
    call = outline(gm, branch.nodes, lambda sub_gm: make_gate(sub_gm, branch), "dropbp_gate",
                   first=branch.output, class_name="ResidualBranch")
    call.meta["dropbp_gate"] = branch.name
    if branch.stream is not None:  # which argument is the residual stream (the gate probes it during calibration)
        call.meta["dropbp_stream_arg"] = call.args.index(branch.stream)
    if "nn_module_stack" in branch.add.meta:
        call.meta["nn_module_stack"] = dict(branch.add.meta["nn_module_stack"])
