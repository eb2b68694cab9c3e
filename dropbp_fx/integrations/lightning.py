"""DropBP for PyTorch Lightning: one added callback.

    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[DropBPLightningCallback(drop_rate=0.75)])
    trainer.fit(module, datamodule)

What the callback does:

* ``on_fit_start``: compiles the LightningModule's network *in place* with the ``dropbp`` backend
  (``module.model`` when the LightningModule keeps its network there, as most recipes do; the
  LightningModule itself otherwise; choose with ``attr=``), so state dicts keep their names;
* after ``calibrate_at`` of training (of ``trainer.max_steps``, or Lightning's estimate of the steps), it
  calibrates the per-branch rates on that step's batch through ``training_step`` (:func:`dropbp_fx.calibrate`);
* logs ``dropbp_drop_fraction`` and ``dropbp_bwd_flops_saved`` every step through ``pl_module.log``;
* saves the drop state (seed, step, rates) in Lightning checkpoints and restores it with
  ``trainer.fit(..., ckpt_path=...)``: a resumed run draws the masks the uninterrupted run would have;
* writes ``dropbp_gates.png`` (:meth:`dropbp_fx.DropBP.plot`) into ``trainer.default_root_dir`` at the end.

Needs ``lightning`` (``pip install lightning``); nothing else in dropbp_fx imports it.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from dropbp_fx.backend import DropBP
from dropbp_fx.calibrate import calibrate
from dropbp_fx.integrations.common import (DropStats, attach, calibration_due, calibration_step,
                                           RECOMMENDED, check_callback_options, check_first_step, check_on_no_gates,
                                           compile_in_place, loss_of)

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover
    raise ImportError("dropbp_fx.integrations.lightning needs Lightning: pip install lightning") from error

log = logging.getLogger(__name__)


class DropBPLightningCallback(Callback):
    """Train a LightningModule with DropBP.

    Args:
        drop_rate: target average drop rate (the FLOPs-weighted target after calibration), or ``"auto"``
            (the default: each calibration chooses the target, :mod:`dropbp_fx.auto`; 0.5 until the first).
        calibrate: ``"fast"``, ``"exact"`` or ``None`` (uniform ``drop_rate``).
        calibrate_at: the fraction of training after which the rates are calibrated.
        attr: the attribute of the LightningModule holding the network to compile (default: ``"model"`` if the
            module has one, else the LightningModule itself).
        plot: write ``dropbp_gates.png`` to ``trainer.default_root_dir`` at the end of training.
        recalibrate_every: calibrate again every this many steps (``None``: once).
        options: the other :class:`~dropbp_fx.DropBPConfig` options (seed, policy, inner, schedule,
            optimizer_mode, ...; ``optimizer_mode`` defaults to ``"lr_scale"`` here, ``"none"`` in the
            backend); ``total_steps`` defaults to the run's steps, the optimizer is attached.
        on_no_gates: after the first step, a network with no gate raises (``"raise"``, with the reason) or warns
            and trains without DropBP (``"warn"``).
    """

    def __init__(self, drop_rate: float | str = RECOMMENDED["drop_rate"], *, calibrate: str | None = "fast", calibrate_at: float = 0.1,
                 recalibrate_every: int | None = None, attr: str | None = None, plot: bool = True,
                 on_no_gates: str = "raise", **options) -> None:
        config = check_callback_options("DropBPLightningCallback", drop_rate, calibrate, calibrate_at, options,
                                        recalibrate_every)
        self.options = dict(calibrate=calibrate, calibrate_at=calibrate_at, recalibrate_every=recalibrate_every,
                            attr=attr, plot=plot,
                            on_no_gates=check_on_no_gates("DropBPLightningCallback", on_no_gates),
                            **{**config.as_dict(), "drop_rate": drop_rate})  # "auto" stays "auto"
        self.gated: bool | None = None  # known after the first training step
        self.dropbp = DropBP.from_config(config)
        self.stats = DropStats(self.dropbp.controller)
        self.calibration = None  # the dropbp_fx.Calibration table, once calibrated
        self.calibrated = False
        self.last_calibration: int | None = None  # global step of the latest calibration
        self.network: nn.Module | None = None
        self._calibration_step = 0

    # -------------------------------------------------------------- Lightning hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        attr = self.options["attr"]
        if attr is None:
            attr = "model" if isinstance(getattr(pl_module, "model", None), nn.Module) else ""
        network = getattr(pl_module, attr) if attr else pl_module
        if not isinstance(network, nn.Module):
            raise ValueError(f"DropBPLightningCallback: {type(pl_module).__name__}.{attr} is not an nn.Module; pass "
                             "attr= the attribute that holds the network")
        if self.network is not network:
            compile_in_place("DropBPLightningCallback", network, self.dropbp)
            self.network = network
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._calibration_step = calibration_step(self.options["calibrate_at"], int(total))
        attach(self.dropbp, trainer.optimizers[0] if len(trainer.optimizers) == 1 else None, int(total))
        log.info("dropbp: %s compiled with the dropbp backend (drop_rate %s, calibrate %s at step %d)",
                 f"{type(pl_module).__name__}.{attr}" if attr else type(pl_module).__name__,
                 self.options["drop_rate"], self.options["calibrate"], self._calibration_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.gated is None:
            self.gated = check_first_step("DropBPLightningCallback", self.dropbp, self.options["on_no_gates"])
        pl_module.log_dict(self.stats.window(), on_step=True, on_epoch=False, prog_bar=False)
        if self.options["calibrate"] is not None and self.gated and calibration_due(
                trainer.global_step, self._calibration_step, self.last_calibration if self.calibrated else None,
                self.options["recalibrate_every"]):
            self.calibration = calibrate(self.network, lambda: loss_of(pl_module.training_step(batch, batch_idx),
                                                                       "DropBPLightningCallback"),
                                         target=self.options["drop_rate"], method=self.options["calibrate"])
            self.calibrated = True
            self.last_calibration = trainer.global_step
            log.info("dropbp: calibrated at step %d (method %s):\n%s", trainer.global_step,
                     self.options["calibrate"], self.calibration)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not (self.options["plot"] and self.dropbp.controller.gates and trainer.is_global_zero):
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("dropbp: no dropbp_gates.png: the gate plot needs matplotlib (pip install matplotlib), "
                        "or pass DropBPLightningCallback(plot=False)")
            return
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        log.info("dropbp: gates plotted to %s",
                 self.dropbp.plot(os.path.join(trainer.default_root_dir, "dropbp_gates.png")))

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"dropbp": self.dropbp.state_dict(), "calibrated": self.calibrated,
                "last_calibration": self.last_calibration}

    def load_state_dict(self, state_dict: dict) -> None:
        """Called by ``trainer.fit(ckpt_path=...)`` before the first step: the next step draws the mask the
        saved run would have drawn."""
        self.dropbp.load_state_dict(state_dict["dropbp"])
        self.calibrated = state_dict["calibrated"]
        self.last_calibration = state_dict.get("last_calibration")
        log.info("dropbp: drop state restored from the checkpoint (step %d)", self.dropbp.step)
