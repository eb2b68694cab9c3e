"""Views: which tensors a write into a node also writes (``k[..., :16].copy_(v)`` writes ``k``).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx



_VIEW_METHODS = {"view", "reshape", "view_as", "transpose", "permute", "narrow", "select", "unsqueeze", "squeeze",
                 "expand", "expand_as", "flatten", "unflatten", "t", "swapaxes", "movedim", "diagonal", "unfold",
                 "split", "chunk", "unbind", "tensor_split"}
_VIEW_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.narrow, torch.transpose,
                   torch.permute, torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}


def view_bases(node: fx.Node) -> list[fx.Node]:
    """The tensors ``node`` is a view of (``x[..., :16]``, ``x.view(...)[0]``), nearest first: what a write
    into ``node`` writes too."""
    bases = []
    while node.args and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        if node.op == "call_function" and node.target is operator.getitem:
            is_view = True  # a slice of a tensor, or a part of a split/chunk/unbind, which alias their input
        elif node.op == "call_method":
            is_view = node.target in _VIEW_METHODS
        elif node.target in _VIEW_FUNCTIONS or getattr(node.target, "__name__", None) == "split":
            is_view = True  # ``torch.functional.split`` too
        else:
            schema = getattr(node.target, "_schema", None)
            info = schema.returns[0].alias_info if schema is not None and schema.returns else None
            is_view = info is not None and not info.is_write
        if not is_view:
            break
        bases.append(source)
        node = source
    return bases
