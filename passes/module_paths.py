"""Module paths of FX nodes: where in the model a node's code runs (``model.layers.3.mlp``), from the
``nn_module_stack`` every tracer records, in the spelling of ``named_modules()``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.fx as fx


_LOCAL_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\](\[[^\]]*\])*\.?")
_GLOBAL_ROOT = re.compile(r"^G(\[|\.)")
_GETATTR = re.compile(r"getattr\(([^()]*), ['\"]([^'\"]+)['\"]\)")
_INDEX = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def clean_module_path(path: str) -> str:
    """``L['self'].model.layers[0]._modules['mlp']`` (or ``L['args'][0].model...``, or PEFT's
    ``L['self'].__dict__['_modules']['base_model']...``) -> ``model.layers.0.mlp``."""
    while True:
        new = _GETATTR.sub(r"\1.\2", path)
        if new == path:
            break
        path = new
    path = _LOCAL_ROOT.sub("", path)
    path = re.sub(r"\.?__dict__\[['\"]_modules['\"]\]", "", path)  # PEFT: ``__dict__['_modules']['base_model']``
    path = path.replace("._modules", "").replace("_modules", "")
    path = _INDEX.sub(r".\1", path)
    path = re.sub(r"\.+", ".", path).strip(".")
    return path


def module_path(node: fx.Node) -> str:
    """The innermost module a node was traced in (``''`` for the root)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    # a module Dynamo reached through a global (``G['__import_transformers...'].causal_conv1d_fn``, a kernel
    # module a library keeps at module level) is not a submodule of the model: the innermost one that is
    paths = [str(entry[0]) for entry in stack.values()]
    own = [p for p in paths if not _GLOBAL_ROOT.match(p)]
    return clean_module_path(own[-1]) if own else ""


def common_module_path(paths: Iterable[str]) -> str:
    split = [p.split(".") if p else [] for p in paths]
    if not split:
        return ""
    prefix = split[0]
    for parts in split[1:]:
        n = 0
        while n < min(len(prefix), len(parts)) and prefix[n] == parts[n]:
            n += 1
        prefix = prefix[:n]
    return ".".join(prefix)


def structure_key(gm: fx.GraphModule) -> str:
    """The graph's ops and wiring with node names left out: equal for identical layers."""
    index: dict[fx.Node, int] = {}
    parts = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        if node.op == "placeholder":  # its name (``l_..._layers_modules_3_...``) is not structure
            parts.append("placeholder")
            continue
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", None) or repr(
            node.target)
        module = getattr(node.target, "__module__", "")
        parts.append(f"{node.op}|{module}.{target}|{args!r}")
    return "\n".join(parts)
