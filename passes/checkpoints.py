"""Activation-checkpointed regions of a Dynamo graph.

With ``model.gradient_checkpointing_enable()`` Dynamo captures each checkpointed
layer as a higher-order op whose body is a submodule; the layer's residual adds
are inside the body, out of reach of a pass over the outer graph.

Before::

    %wrap_body_0 = get_attr[wrap_body_0]
    %ckpt = tag_activation_checkpoint(%wrap_body_0, %x, %w_q, ..., use_reentrant=False)
    %h    = getitem(%ckpt, 0)

After (``replace_checkpoint_calls(gm, make_module)``)::

    %ckpt = call_module[dropbp_checkpoint_0](%x, %w_q, ...)   # make_module(body, kwargs)
    %h    = getitem(%ckpt, 0)

so that the body can be rewritten like any graph and run under eager checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from .outline import free_attr


def _is_checkpoint(node: fx.Node) -> bool:
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return node.op == "call_function" and hop is not None and node.target is hop


def checkpoint_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.GraphModule]]:
    """``(call node, body)`` for every activation-checkpointed region of ``gm``."""
    calls = []
    for node in gm.graph.nodes:
        if _is_checkpoint(node) and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr":
            calls.append((node, getattr(gm, node.args[0].target)))
    return calls


def replace_checkpoint_calls(gm: fx.GraphModule, make_module: Callable[[fx.GraphModule, dict], nn.Module],
                             prefix: str = "dropbp_checkpoint") -> list[str]:
    """Replace each checkpoint higher-order op by a call of ``make_module(body, kwargs)``; returns their names."""
    names = []
    for node, body in checkpoint_calls(gm):
        attr = free_attr(gm, prefix)
        gm.add_submodule(attr, make_module(body, dict(node.kwargs)))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(attr, args=tuple(node.args[1:]))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        body_attr = node.args[0]
        gm.graph.erase_node(node)
        if not body_attr.users:
            gm.graph.erase_node(body_attr)
        names.append(attr)
    if names:
        gm.graph.lint()
        gm.recompile()
    return names
