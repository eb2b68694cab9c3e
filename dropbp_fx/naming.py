"""The parameters each gate consumes, and the gates of a graph that several layers run through.

A gate is named by the module path of its branch (``model.layers.3.mlp``): :func:`dropbp_fx.passes.branch_names.
gate_name`, the one place names are made, from the structure :func:`dropbp_fx.passes.residuals.
find_residual_branches` decides. This module adds what needs the model: the names of the parameters a branch
reads (for ``keep_one_open='auto'`` and calibration), and, for a graph Dynamo compiled for one layer's frame and
reuses for every identical layer, the gate of each such layer (:class:`LayerSiblings`).
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch.fx as fx
from torch import nn

from dropbp_fx.gate_spec import GateSpec
from dropbp_fx.passes.branch_names import BranchPath, gate_name
from dropbp_fx.shapes import attr


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


class LayerSiblings:
    """The gates of one gate of a layer-frame graph (``blocks.0``), one per layer that may run through it.

    Dynamo reuses such a graph for every identical layer; the gate tells layers apart by one of its parameters
    (an argument of the call): ``blocks.0.mlp`` was compiled with ``blocks.0.mlp.0.weight``; called with
    ``blocks.1.mlp.0.weight`` it runs as ``blocks.1.mlp``. Every layer's spec is decided here, when the graph is
    rewritten, from the model's parameter names; the gate registers a layer's spec at that layer's first call
    (which layers reuse a graph, and in which order, only the calls tell).
    """

    def __init__(self, spec: GateSpec, path: BranchPath, suffix: str, owned: list[str], names: dict[int, str],
                 model: nn.Module | None = None) -> None:
        self._spec, self._path, self._suffix, self._owned = spec, path, suffix, owned
        self._names = names  # id(parameter) -> name, as read when the graph was rewritten (never changed)
        self._model = weakref.ref(model) if model is not None else None
        layers = {n[: len(n) - len(suffix)] for n in names.values() if n.endswith(suffix)}
        self.specs = {layer: self._layer_spec(layer) for layer in layers}  # layer path -> its gate
        self.specs[path.frame] = spec

    def _layer_spec(self, layer: str) -> GateSpec:
        return replace(self._spec, name=gate_name(self._path.in_frame(layer)),
                       params=frozenset(layer + n for n in self._owned))

    def spec_for(self, parameter) -> GateSpec:
        """The gate of the layer owning ``parameter`` (this graph's own gate for a parameter of no such layer)."""
        full = self._names.get(id(parameter))
        if full is None and self._model is not None and self._model() is not None:
            # FSDP2 registers a layer's unsharded parameters only around its forward (sharded ones otherwise)
            self._names = {**self._names, **parameter_names(self._model())}
            full = self._names.get(id(parameter))
        if full is None or not full.endswith(self._suffix):
            return self._spec
        layer = full[: len(full) - len(self._suffix)]
        return self.specs[layer] if layer in self.specs else self._layer_spec(layer)


def layer_siblings(spec: GateSpec, path: BranchPath, params: list[tuple[int | None, str, nn.Parameter]],
                   names: dict[int, str], model=None) -> tuple[int, LayerSiblings] | None:
    """For a gate of a layer-frame graph (``path.frame``, e.g. ``blocks.0``) consuming ``params``
    (:func:`branch_parameters`): the argument that tells layers apart, and the layers' gates. None when no
    argument is a parameter of the layer."""
    prefix = path.frame
    anchors = [(i, n) for i, n, _ in params if i is not None and n.startswith(prefix + ".")]
    if not anchors:
        return None
    index, anchor = anchors[0]
    owned = [n[len(prefix):] for _, n, _ in params if n.startswith(prefix + ".")]  # ".mlp.0.weight", ...
    return index, LayerSiblings(spec, path, anchor[len(prefix):], owned, names, model)
