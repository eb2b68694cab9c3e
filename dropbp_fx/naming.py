"""Gate names and the parameters each gate consumes.

A gate is named by the module path of its branch (``model.layers.3.mlp``, see
:func:`dropbp_fx.passes.residuals.find_residual_branches`). This module adds what needs the model: the
names of the parameters a branch reads (for ``keep_one_open='auto'`` and calibration), and, for a graph
Dynamo compiled for one layer's frame and reuses for every identical layer, how each call tells which
layer it runs for.
"""

from __future__ import annotations

import weakref

import torch.fx as fx
from torch import nn

from dropbp_fx.shapes import attr, placeholder_values


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> its name in ``model`` (tied parameters under every name's first)."""
    return {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}


def branch_parameters(gm: fx.GraphModule, call_args, branch_module: nn.Module, values: dict,
                      names: dict[int, str]) -> list[tuple[int | None, str, nn.Parameter]]:
    """``[(argument index or None, parameter name, parameter)]`` of one gate's branch.

    Parameters reach a gate as arguments (Dynamo placeholders, ``get_attr`` nodes: the index is set) or
    inside its branch (``call_module`` of a ``symbolic_trace`` graph).
    """
    params = []
    for index, arg in enumerate(call_args):
        value = values.get(arg)
        if value is None and isinstance(arg, fx.Node) and arg.op == "get_attr":
            value = attr(gm, arg.target)
        if isinstance(value, nn.Parameter) and id(value) in names:
            params.append((index, names[id(value)], value))
    params += [(None, names[id(p)], p) for p in branch_module.parameters() if id(p) in names]
    return params


def anchor_gates(gm: fx.GraphModule, gates: list[tuple[fx.Node, nn.Module]], example_inputs,
                 names: dict[int, str], prefix: str, model=None) -> None:
    """Let the gates of a layer-frame graph (``blocks.0``) name themselves after the layer they run for.

    Dynamo reuses such a graph for every identical layer; each gate is told which argument is one of
    its parameters, and names a new layer's gate by swapping the layer prefix: ``blocks.0.mlp`` was
    compiled with ``blocks.0.mlp.0.weight``; called with ``blocks.1.mlp.0.weight`` it is ``blocks.1.mlp``.
    """
    values = placeholder_values(gm, example_inputs)
    for call, gate in gates:
        params = branch_parameters(gm, call.args, gate.branch, values, names)
        anchors = [(i, n, p) for i, n, p in params if i is not None and n.startswith(prefix + ".")]
        if not anchors:
            continue
        index, anchor, parameter = anchors[0]
        owned = [n[len(prefix):] for _, n, _ in params if n.startswith(prefix + ".")]  # ".mlp.0.weight", ...
        gate.anchor_on(index, _layer_namer(names, anchor[len(prefix):], gate.gate_name[len(prefix):], owned, model),
                       parameter)


def _layer_namer(names: dict[int, str], suffix: str, relative: str, owned: list[str], model=None):
    model = weakref.ref(model) if model is not None else None

    def namer(parameter):
        if id(parameter) not in names and model is not None and model() is not None:
            # FSDP2 registers a layer's unsharded parameters only around its forward (sharded ones otherwise)
            names.update(parameter_names(model()))
        full = names.get(id(parameter))
        if full is None or not full.endswith(suffix):
            return None, ()
        layer = full[: len(full) - len(suffix)]
        return layer + relative, [layer + n for n in owned]
    return namer
