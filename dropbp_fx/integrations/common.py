"""What the framework integrations share; imports no framework."""

from __future__ import annotations

import torch
from torch import nn

from dropbp_fx.calibrate import METHODS, calibration_step  # noqa: F401 (calibration_step: shared)
from dropbp_fx.config import DropBPConfig, check_rate
from dropbp_fx.tracing import traced_with_our_settings


def check_callback_options(owner: str, drop_rate, calibrate, calibrate_at, options: dict) -> DropBPConfig:
    """The options of a callback, checked (``ValueError`` naming ``owner`` and the valid values)."""
    check_rate(f"{owner} drop_rate", drop_rate)
    if calibrate is not None and calibrate not in METHODS:
        raise ValueError(f"{owner} calibrate must be one of {tuple(METHODS)} or None, got {calibrate!r}")
    if not 0.0 <= calibrate_at < 1.0:
        raise ValueError(f"{owner} calibrate_at is a fraction of training in [0, 1), got {calibrate_at!r}")
    return DropBPConfig(drop_rate=drop_rate, **options)


def compile_in_place(owner: str, model: nn.Module, backend) -> None:
    """``model.compile(backend=...)``: the module stays itself (its state dict and ``save_pretrained`` keep their
    names). A model compiled already is refused: the integration must compile it with its own backend."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError(f"{owner}: the model is already compiled (model.compile(...)); pass the uncompiled model "
                         "and let the callback compile it")
    model.compile(backend=backend)
    # Dynamo's settings for checkpointed layers (gradient checkpointing on: the gates go inside), while it traces
    model._compiled_call_impl = traced_with_our_settings(model._compiled_call_impl)


class DropStats:
    """Drop fraction and share of branch backward FLOPs saved, over the gate calls since the last :meth:`window`."""

    def __init__(self, controller) -> None:
        self.controller = controller
        self._last: dict[str, tuple[int, int]] = {}

    def window(self) -> dict[str, float]:
        counts = {g.name: (g.drops, g.calls, g.flops[1] if g.flops else 0) for g in self.controller.gates}
        dropped = calls = flops_saved = flops_run = 0
        for name, (drops, n, bwd) in counts.items():
            d0, n0 = self._last.get(name, (0, 0))
            dropped, calls = dropped + drops - d0, calls + n - n0
            flops_saved += (drops - d0) * bwd
            flops_run += (n - n0) * bwd
        self._last = {name: (d, n) for name, (d, n, _) in counts.items()}
        return {"dropbp_drop_fraction": round(dropped / calls, 4) if calls else 0.0,
                "dropbp_bwd_flops_saved": round(flops_saved / flops_run, 4) if flops_run else 0.0}


def loss_of(outputs, owner: str) -> torch.Tensor:
    """The loss of a model output or a ``training_step`` result: the tensor itself, ``["loss"]`` (transformers'
    outputs, Lightning's dicts), or the first element of a tuple."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        if "loss" not in outputs or outputs["loss"] is None:
            raise ValueError(f"{owner} calibration: the model returned no loss for the training batch; the batch "
                             "needs labels (as the trainer's own loss does)")
        return outputs["loss"]
    return outputs[0]
