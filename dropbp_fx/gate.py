"""The runtime op the gate pass inserts: a residual branch called through a drop gate.

Contract, for a branch ``f`` and its inputs ``args``:

* open gate: ``f(*args)`` exactly, with autograd as usual;
* closed gate: ``f(*args)`` run under ``torch.no_grad()``: the same forward values,
  no activations saved, no backward node. The add that consumes the output then
  computes ``skip + f(*args).detach()``: gradient reaches earlier layers through
  the skip only, and the branch's parameters get no gradient this step.

Whether a gate is closed is decided per step, outside the graph, by a controller
(``dropbp_fx.controller.DropController``), which owns the gate's record (name, rate, FLOPs,
parameters, counts: ``controller.gates[slot]``). The gate module holds its slot and the controller it is given;
it registers nothing itself: the backend registers the gate's :class:`~dropbp_fx.gate_spec.GateSpec` and hands it
the slot. On every call it asks ``controller.is_dropped(slot)``. While a calibration records
(``controller.recording()``), the gate also reads the gradients at its stream input and its output (see
:mod:`dropbp_fx.probe`).

``recompute=True`` (:class:`~dropbp_fx.DropBPConfig`): an open gate runs its branch under non-reentrant
``torch.utils.checkpoint`` (RNG state preserved: dropout replays), so the branch stores only its inputs and
runs ``run_open`` again in backward. The recompute calls ``run_open`` directly, never this gate, so it asks
the controller nothing: the mask of the step is the forward's. Inside a checkpointed region (which recomputes
the branch already) the gate runs as without ``recompute``.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from dropbp_fx.checkpoint import inside_region
from dropbp_fx.probe import record_grad


class DropGate(nn.Module):
    """Calls ``branch`` with autograd on when open, off when closed. Always returns a tuple."""

    def __init__(self, branch: nn.Module, controller, *, recompute: bool = False,
                 stream_arg: int | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.controller = controller
        self.slot: int | None = None  # ``controller.gates[slot]``; set by the backend when it registers the gate
        # What runs for an open / a closed gate; an inner compiler may replace either.
        self.run_open = branch
        self.run_closed = branch
        self.recompute = recompute  # an open branch stores nothing and runs again in backward
        self.stream_arg = stream_arg  # which argument is the residual stream (for calibration probes)
        # A graph Dynamo compiled for one layer's frame is reused for every identical layer: the gate then tells
        # layers apart by a parameter it receives (argument ``anchor``), and takes each layer's spec, decided when
        # the graph was rewritten, from ``siblings`` (:class:`dropbp_fx.naming.LayerSiblings`).
        self.anchor: int | None = None
        self.siblings = None
        self._slots: dict[int, int] = {}  # id(anchor parameter) -> slot

    def anchor_on(self, index: int, siblings) -> None:
        """Run for the layer owning argument ``index``: ``siblings.spec_for(parameter)`` is that layer's gate."""
        self.anchor, self.siblings = index, siblings

    def forward(self, *args):
        slot = self.slot if self.anchor is None else self._slot_for(args[self.anchor])
        recorder = self.controller.recorder
        probing = recorder.active and self.stream_arg is not None and torch.is_grad_enabled()
        if probing:  # the gradient that flows back into the stream through the branch
            args = list(args)
            args[self.stream_arg] = record_grad(args[self.stream_arg], recorder, slot, "in")
        if self.training and self.controller.is_dropped(slot):
            with torch.no_grad():
                outputs = self.run_closed(*args)
            # Outputs made under no_grad may be views; a later in-place add with grad on
            # (``mlp_out += attn_out``) is refused on such views, so hand out plain tensors.
            return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in outputs)
        if self.recompute and self.training and torch.is_grad_enabled() and not inside_region():
            outputs = torch.utils.checkpoint.checkpoint(self.run_open, *args, use_reentrant=False,
                                                        preserve_rng_state=True)
        else:
            outputs = self.run_open(*args)
        if probing:  # the gradient the stream carries at the add
            outputs = (record_grad(outputs[0], recorder, slot, "out"), *outputs[1:])
        return outputs

    def _slot_for(self, parameter) -> int:
        slot = self._slots.get(id(parameter))
        if slot is None:  # the first call for this layer: its gate, as the rewrite decided it
            slot = self._slots[id(parameter)] = self.controller.register(self.siblings.spec_for(parameter))
        return slot

    def extra_repr(self) -> str:
        name = self.controller.gates[self.slot].name if self.slot is not None else None
        return f"name={name!r}, slot={self.slot}" + (", recompute=True" if self.recompute else "")
