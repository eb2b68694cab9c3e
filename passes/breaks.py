"""Residual branches a graph break cut in two.

Dynamo ends a graph where it cannot trace (a data-dependent ``.item()``, an unsupported call) and starts
the next one after it. A break inside a residual branch leaves no graph holding the whole ``x + f(x)``:
the first graph ends with the branch's partial results as outputs, the second starts from them, and
neither add can be gated.

Before (the graph that ends at the break, JetMoE's router)::

    x ──► attn ──► add ──► norm ──► router linear ──► output (the break follows)
                    └───────────────────────────────► output

:func:`cut_branches` reads the graph without changing it. It returns the compute nodes whose result leaves
the graph without passing through a residual add (``router linear`` above, not ``attn``, whose result the
add took in): a branch the graph ends inside of. :func:`describe_break` turns Dynamo's own record of the
break (``gm.compile_subgraph_reason``) into the op that broke the graph, the user's line and Dynamo's fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from . import graph_view as gv


def cut_branches(gm: fx.GraphModule, residual_adds: set[fx.Node], root: nn.Module | None = None,
                 inside: set[fx.Node] = frozenset(), heads: frozenset[str] = frozenset()) -> list[str]:
    """Module paths of compute on a trainable weight whose result is a graph output by a path that avoids
    every residual add in ``residual_adds`` (the adds of the branches found in ``gm``), and whose residual
    stream leaves the graph too (the add would be in the next graph).

    Not cut: compute inside a branch found whole (``inside``: a KV cache it returns) or feeding one (a
    cross-attention's keys of the encoder output, also returned as its cache: SwitchTransformers), and compute
    on a stream the graph does not return (a head: ``lm_head(norm(h))`` before a break in the loss), nor the
    model's output head itself (``heads``: module paths; GPT-2's ``ln_f, lm_head`` between two breaks, whose
    stream goes on as a graph input for all this graph can tell).
    """
    root = gm if root is None else root
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned = set(output.all_input_nodes)
    seen: set[fx.Node] = set()
    stack = list(output.all_input_nodes)
    cut: dict[str, None] = {}
    while stack:  # backwards from the outputs, stopping at residual adds and at constants
        node = stack.pop()
        if node in seen or node in residual_adds or gv.is_constant(node) or gv.is_shape_query(node):
            continue
        seen.add(node)
        if gv.is_compute(node, root) and _reads_trainable(node, root):
            if gv.module_path(node) not in heads and node not in inside and not _feeds(node, inside, root) \
                    and _stream_leaves(node, residual_adds, returned, root):
                cut[gv.module_path(node)] = None
            continue
        stack.extend(node.all_input_nodes)
    return list(cut)


def _feeds(compute: fx.Node, inside: set[fx.Node], root) -> bool:
    """Does ``compute``'s result reach a node of a branch found whole through non-compute nodes (views,
    transposes, a cache's ``cat``)?"""
    seen: set[fx.Node] = set()
    stack = list(compute.users)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in inside:
            return True
        if node.op != "output" and not gv.is_compute(node, root):
            stack.extend(node.users)
    return False


def _stream_leaves(compute: fx.Node, residual_adds: set[fx.Node], returned: set[fx.Node], root) -> bool:
    """Does the residual stream ``compute`` reads (the residual adds and graph inputs behind it, through
    non-compute nodes: norms, casts) reach the next graph? A graph input does (Dynamo hands the frame's
    locals on); a residual add only if the graph returns it."""
    seen: set[fx.Node] = set()
    stack = list(compute.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen or gv.is_constant(node) or gv.is_shape_query(node):
            continue
        seen.add(node)
        if node.op == "placeholder":
            return True
        if node in residual_adds:
            if node in returned or any(u in returned for u in node.users if gv.is_alias(u)):
                return True
            continue
        if not gv.is_compute(node, root):
            stack.extend(node.all_input_nodes)
    return False


def _reads_trainable(node: fx.Node, root: nn.Module) -> bool:
    """``node`` reads a weight that trains (a frozen base weight beside a LoRA adapter does not)."""
    for arg in node.all_input_nodes:
        for _ in range(4):  # W, W.T, W.to(dtype), ...
            if gv.is_constant(arg) or arg.op not in ("call_method", "call_function") or len(arg.all_input_nodes) != 1:
                break
            arg = arg.all_input_nodes[0]
        if not gv.is_constant(arg):
            continue
        value = gv.meta_value(arg)
        if value is None and arg.op == "get_attr":
            value = getattr(root.get_submodule(arg.target.rpartition(".")[0]), arg.target.rpartition(".")[2], None)
        if getattr(value, "requires_grad", False):
            return True
    return False


@dataclass
class GraphBreak:
    op: str  # Dynamo's first line: "Data dependent operator", "Unsupported method call", ...
    detail: str  # the operator or call Dynamo names, if any
    where: str  # file:line of the user's code at the break
    fix: str

    def describe(self) -> str:
        what = f"{self.op} ({self.detail})" if self.detail else self.op
        return f"{what} at {self.where}" if self.where else what


_HINT = re.compile(r"Hint:\s*(.+)")
_DETAIL = re.compile(r"(?:Operator|Developer debug context:)\s*`?([\w.:]+)`?")


def describe_break(gm: fx.GraphModule) -> GraphBreak | None:
    """Dynamo's record of the break that ended ``gm`` (``None`` when ``gm`` did not end at one)."""
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(reason.reason)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = _DETAIL.search(text)
    hints = _HINT.findall(text)
    fix = hints[0].strip() if hints else ("remove the break from the branch: torch._dynamo.explain(model)(*inputs) "
                                          "shows where it is")
    stack = list(getattr(reason, "user_stack", None) or [])
    where = f"{stack[-1].filename.rsplit('/', 1)[-1]}:{stack[-1].lineno}" if stack else ""
    return GraphBreak(lines[0] if lines else "graph break", detail.group(1) if detail else "", where, fix)
