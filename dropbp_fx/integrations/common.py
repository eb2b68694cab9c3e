"""What the framework integrations share; imports no framework."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from dropbp_fx.calibrate import METHODS, calibration_step  # noqa: F401 (calibration_step: shared)
from dropbp_fx.config import RECOMMENDED, DropBPConfig, check_rate  # noqa: F401 (RECOMMENDED: shared)
from dropbp_fx.gate_spec import flops_shares
from dropbp_fx.reports import DropBPWarning
from dropbp_fx.tracing import compile_in_place  # noqa: F401 (shared by the callbacks)


AUTO_START = 0.5  # drop_rate="auto": the uniform rate until the first calibration chooses the target


def check_callback_options(owner: str, drop_rate, calibrate, calibrate_at, options: dict,
                           recalibrate_every=None) -> DropBPConfig:
    """The options of a callback, checked (``ValueError`` naming ``owner`` and the valid values).
    ``drop_rate="auto"``: the calibration chooses the target (:mod:`dropbp_fx.auto`); it needs ``calibrate``."""
    if drop_rate == "auto":
        if calibrate is None:
            raise ValueError(f"{owner}(drop_rate='auto', the default) chooses the rate at each calibration: pass "
                             "calibrate='fast' (or 'exact'), or a fixed drop_rate (0.5, ...) with calibrate=None")
    else:
        check_rate(f"{owner} drop_rate", drop_rate)
    if calibrate is not None and calibrate not in METHODS:
        raise ValueError(f"{owner} calibrate must be one of {tuple(METHODS)} or None, got {calibrate!r}")
    if not 0.0 <= calibrate_at < 1.0:
        raise ValueError(f"{owner} calibrate_at is a fraction of training in [0, 1), got {calibrate_at!r}")
    if recalibrate_every is not None and (isinstance(recalibrate_every, bool) or not isinstance(recalibrate_every, int)
                                          or recalibrate_every < 1):
        raise ValueError(f"{owner} recalibrate_every must be None or a positive int (steps), got {recalibrate_every!r}")
    options = {"optimizer_mode": RECOMMENDED["optimizer_mode"], **options}
    return DropBPConfig(drop_rate=AUTO_START if drop_rate == "auto" else drop_rate, **options)


def calibration_due(step: int, first: int, last: int | None, every: int | None) -> bool:
    """Calibrate at ``first``, then every ``every`` steps after the ``last`` calibration."""
    if last is None:
        return step >= first
    return every is not None and step - last >= every


def attach(dbp, optimizer, total_steps: int | None) -> None:
    """The run's facts the callbacks know: its length (for the ramps, unless ``total_steps`` was given) and its
    optimizer (for ``optimizer_mode``; framework wrappers such as accelerate's are looked through)."""
    if dbp.options.total_steps is None and total_steps:
        dbp.set_total_steps(total_steps)
    # accelerate's AcceleratedOptimizer subclasses Optimizer without its hook tables: the optimizer it wraps
    # (.optimizer) steps inside it and takes the hooks
    while optimizer is not None and (not isinstance(optimizer, torch.optim.Optimizer)
                                     or isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)):
        optimizer = getattr(optimizer, "optimizer", None)
    if optimizer is not None:
        dbp.attach_optimizer(optimizer)
    elif dbp.options.optimizer_mode != "none":
        raise ValueError(f"dropbp: optimizer_mode={dbp.options.optimizer_mode!r} needs the optimizer, and the "
                         "framework passed none to the callback")


ON_NO_GATES = ("raise", "warn")


def check_on_no_gates(owner: str, on_no_gates: str) -> str:
    if on_no_gates not in ON_NO_GATES:
        raise ValueError(f"{owner} on_no_gates must be one of {ON_NO_GATES}, got {on_no_gates!r}")
    return on_no_gates


def check_first_step(owner: str, dbp, on_no_gates: str) -> bool:
    """After the first training step: does the model have a gate? What would otherwise fail later (the
    calibration at ``calibrate_at``) or train silently without DropBP is said now: ``on_no_gates="raise"`` raises
    with the reason and the fix, ``"warn"`` warns once (``DropBPWarning``) and training goes on without DropBP
    (the callback then does not calibrate). Returns whether the model is gated."""
    if dbp.controller.gates:
        return True
    why = (f"{owner}: the first training step reached no residual branch the dropbp backend could gate, so "
           "nothing would ever be dropped (and calibration could not run). The DropBPWarning above says why; "
           "`python -m dropbp_fx explain MODEL` or dropbp_fx.explain(model, **batch) lists every add. To train "
           f"without DropBP anyway, pass {owner}(..., on_no_gates='warn').")
    if on_no_gates == "raise":
        raise RuntimeError(why)
    warnings.warn(why, DropBPWarning, stacklevel=3)
    return False


class DropStats:
    """Drop fraction and share of branch backward FLOPs saved, over the gate calls since the last :meth:`window`."""

    def __init__(self, controller) -> None:
        self.controller = controller
        self._last: dict[str, tuple[int, int]] = {}

    def window(self) -> dict[str, float]:
        gates = self.controller.gates
        counts = {g.name: (g.drops, g.calls, share) for g, share in zip(gates, flops_shares(gates)[1])}
        dropped = calls = flops_saved = flops_run = 0
        for name, (drops, n, share) in counts.items():
            d0, n0 = self._last.get(name, (0, 0))
            dropped, calls = dropped + drops - d0, calls + n - n0
            flops_saved += (drops - d0) * share
            flops_run += (n - n0) * share
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
