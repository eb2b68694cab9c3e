"""Group the trunk of a gated graph into segments an inner compiler can take whole.

A gate decides at run time whether its branch keeps a backward, so it cannot sit
inside one static compiled graph. This pass outlines every run of trunk nodes
between two gate calls into a submodule of its own.

Before (after :func:`passes.gating.gate_residual_branches`)::

    %emb   = embedding(%ids, %w_emb)
    %g0    = call_module[dropbp_gate_0](%emb, ...)
    %o0    = getitem(%g0, 0)
    %h1    = add(%emb, %o0)
    %g1    = call_module[dropbp_gate_1](%h1, ...)
    %o1    = getitem(%g1, 0)
    %h2    = add(%h1, %o1)
    %loss  = cross_entropy(linear(norm(%h2), ...), %labels)

After (``split_trunk(gm, is_gate)``)::

    %t0    = call_module[dropbp_trunk_0](%ids, %w_emb)     # embedding
    %emb   = getitem(%t0, 0)
    %g0    = call_module[dropbp_gate_0](%emb, ...)
    %o0    = getitem(%g0, 0)
    %t1    = call_module[dropbp_trunk_1](%emb, %o0)        # add
    ...

Runs that compute nothing but metadata (sizes, dtypes) stay inline.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.tools_common import stable_topological_sort

from passes.outline import outline


def split_trunk(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool],
                make_module: Callable[[fx.GraphModule], nn.Module] = lambda sub_gm: sub_gm,
                prefix: str = "dropbp_trunk") -> list[str]:
    """Outline each run of trunk nodes between gate calls; returns the new submodules' names."""
    runs: list[list[fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if is_gate(node) or (node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                             and is_gate(node.args[0])):
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(node)
    names = []
    for run in runs:
        if run and any(_computes_tensor(n) for n in run):
            names.append(outline(gm, run, make_module, prefix, class_name="TrunkSegment").target)
    stable_topological_sort(gm)
    gm.graph.lint()
    gm.recompile()
    return names


def _computes_tensor(node: fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        return node.op in ("call_function", "call_method", "call_module")
    return isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list))
                                               and any(isinstance(v, torch.Tensor) for v in value))
