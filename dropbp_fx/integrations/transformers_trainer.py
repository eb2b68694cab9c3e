"""DropBP for Hugging Face ``Trainer``: one added line.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DropBPCallback(drop_rate=0.75, calibrate="fast")])

What the callback does:

* ``on_train_begin``: compiles the model *in place* (``model.compile(backend=DropBP(...))``, so
  ``save_pretrained`` and the state dict keep their names) with the ``dropbp`` backend.
  ``TrainingArguments(torch_compile_backend="dropbp")`` cannot do this: accelerate only accepts the
  backend names of its ``DynamoBackend`` enum and raises ``ValueError: 'DROPBP' is not a valid
  DynamoBackend``.
* at ``calibrate_at`` of training (10% by default, as in the paper), it measures the branches'
  sensitivities on that step's batch (:func:`dropbp_fx.calibrate`) and sets per-branch rates whose
  backward FLOPs budget meets ``drop_rate``; until then every branch uses ``drop_rate``;
* every Trainer log line gets ``dropbp_drop_fraction`` (gate calls dropped since the last log) and
  ``dropbp_bwd_flops_saved`` (the share of the branches' backward FLOPs those drops saved);
* its state (step, rates, seed) is saved in ``trainer_state.json`` with every checkpoint and restored
  by ``trainer.train(resume_from_checkpoint=...)``.

Gradient accumulation works: every micro-batch forward draws its own mask. With
``gradient_checkpointing=True`` the gates go inside the checkpointed layers.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from dropbp_fx.backend import DropBP
from dropbp_fx.calibrate import calibrate
from dropbp_fx.integrations.common import (DropStats, attach, calibration_due, calibration_step,
                                           RECOMMENDED, check_callback_options, check_first_step, check_on_no_gates,
                                           compile_in_place, loss_of)

log = logging.getLogger(__name__)

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as error:  # pragma: no cover
    raise ImportError("dropbp_fx.integrations needs transformers: pip install transformers") from error


class DropBPCallback(TrainerCallback, ExportableState):
    """Train with DropBP under ``transformers.Trainer``.

    Args:
        drop_rate: target average drop rate (the FLOPs-weighted target after calibration), or ``"auto"``
            (the default: each calibration chooses the target, :mod:`dropbp_fx.auto`; 0.5 until the first).
        calibrate: ``"fast"`` (one backward pass), ``"exact"`` (N+1) or ``None`` (uniform ``drop_rate``).
        calibrate_at: the fraction of ``max_steps`` after which the rates are calibrated.
        recalibrate_every: calibrate again every this many steps (``None``: once).
        options: the other :class:`~dropbp_fx.DropBPConfig` options (seed, policy, keep_one_open, inner,
            schedule, ramp, min_rate, max_rate, optimizer_mode, ...;
            ``optimizer_mode`` defaults to ``"lr_scale"`` here, ``"none"`` in the backend); ``total_steps`` defaults to ``max_steps``
            and the Trainer's optimizer is attached for ``optimizer_mode``.
        plot: at the end of training, write ``dropbp_gates.png`` (rates, realised drops, FLOPs shares per gate,
            :meth:`dropbp_fx.DropBP.plot`) to the output directory (needs matplotlib).
        on_no_gates: after the first step, a model with no gate raises (``"raise"``, with the reason) or warns
            and trains without DropBP (``"warn"``).
    """

    def __init__(self, drop_rate: float | str = RECOMMENDED["drop_rate"], *, calibrate: str | None = "fast", calibrate_at: float = 0.1,
                 recalibrate_every: int | None = None, plot: bool = True, on_no_gates: str = "raise",
                 **options) -> None:
        config = check_callback_options("DropBPCallback", drop_rate, calibrate, calibrate_at, options,
                                        recalibrate_every)
        self.options = dict(calibrate=calibrate, calibrate_at=calibrate_at, recalibrate_every=recalibrate_every,
                            plot=plot, on_no_gates=check_on_no_gates("DropBPCallback", on_no_gates),
                            **{**config.as_dict(), "drop_rate": drop_rate})  # "auto" stays "auto"
        self.options = {k: v for k, v in self.options.items() if not callable(v)}  # trainer_state.json is JSON
        self.gated: bool | None = None  # known after the first training step
        self.dropbp = DropBP.from_config(config)
        self.stats = DropStats(self.dropbp.controller)
        self.calibrated = False
        self.last_calibration: int | None = None  # global step of the latest calibration
        self.calibration = None  # the dropbp_fx.Calibration table, once calibrated
        self._resume_state: dict | None = None
        self._batch: dict | None = None
        self._hook = None
        self._model: nn.Module | None = None

    # -------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if getattr(args, "torch_compile", False):
            raise ValueError("DropBPCallback compiles the model itself with the dropbp backend; remove "
                             "torch_compile=True (and torch_compile_backend) from TrainingArguments")
        if model is None:
            raise ValueError("DropBPCallback: the Trainer passed no model to the callback")
        if self._model is not model:
            compile_in_place("DropBPCallback", model, self.dropbp)
            self._model = model
        self._restore(state)
        attach(self.dropbp, kwargs.get("optimizer"), state.max_steps)
        self._calibration_step = calibration_step(self.options["calibrate_at"], state.max_steps)
        log.info("dropbp: Trainer model compiled with the dropbp backend (drop_rate %s, calibrate %s at step %d)",
                 self.options["drop_rate"], self.options["calibrate"], self._calibration_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._wants_calibration(state) and self._hook is None:
            self._hook = self._model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.gated is None:
            self.gated = check_first_step("DropBPCallback", self.dropbp, self.options["on_no_gates"])
        if self._hook is None or self._batch is None:
            return
        self._hook.remove()
        self._hook = None
        batch, self._batch = self._batch, None
        if not self.gated:  # warned: training goes on without DropBP, nothing to calibrate
            return
        self.calibration = calibrate(self._model, lambda: loss_of(self._model(**batch), "DropBPCallback"),
                                     target=self.options["drop_rate"], method=self.options["calibrate"])
        self.calibrated = True
        self.last_calibration = state.global_step
        log.info("dropbp: calibrated at step %d (method %s):\n%s", state.global_step, self.options["calibrate"],
                 self.calibration)

    def on_train_end(self, args, state, control, **kwargs):
        """The picture of the gates (rates, realised drops, FLOPs shares) into the output directory."""
        if not (self.dropbp.controller.gates and state.is_world_process_zero and self.options["plot"]):
            return
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning("dropbp: no dropbp_gates.png: the gate plot needs matplotlib (pip install matplotlib), "
                        "or pass DropBPCallback(plot=False)")
            return
        path = self.dropbp.plot(os.path.join(args.output_dir, "dropbp_gates.png"))
        log.info("dropbp: gates plotted to %s", path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # training log lines only, not eval/summary lines
            return
        fields = self.window_stats()
        logs.update(fields)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(fields)

    # -------------------------------------------------------------- figures
    def window_stats(self) -> dict[str, float]:
        """Drop fraction and share of branch backward FLOPs saved since the previous call."""
        return self.stats.window()

    # -------------------------------------------------------------- checkpoints (trainer_state.json)
    def state(self) -> dict:
        return {"args": self.options,
                "attributes": {"_resume_state": self.dropbp.state_dict(), "calibrated": self.calibrated,
                               "last_calibration": self.last_calibration}}

    def _restore(self, state) -> None:
        """On ``train(resume_from_checkpoint=...)``: the drop state saved with the checkpoint.

        Trainer restores callbacks itself only with ``restore_callback_states_from_checkpoint=True``;
        otherwise the state is read from the checkpoint's ``trainer_state.json``, which Trainer loaded.
        """
        if self._resume_state is None and state.global_step > 0:
            stored = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(stored, list):
                stored = stored[0] if len(stored) == 1 else None
            if stored:
                self._resume_state = stored["attributes"]["_resume_state"]
                self.calibrated = stored["attributes"]["calibrated"]
                self.last_calibration = stored["attributes"].get("last_calibration")
        if self._resume_state is not None:
            self.dropbp.load_state_dict(self._resume_state)
            self._resume_state = None
            log.info("dropbp: drop state restored from the checkpoint (step %d)", self.dropbp.step)

    # -------------------------------------------------------------- helpers
    def _wants_calibration(self, state) -> bool:
        return (self.options["calibrate"] is not None and self.gated is not False
                and calibration_due(state.global_step, self._calibration_step, self.last_calibration
                                    if self.calibrated else None, self.options["recalibrate_every"]))

    def _keep_batch(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            if args:
                raise ValueError("DropBPCallback calibration expects Trainer's keyword-argument batches "
                                 "(model(**inputs))")
            self._batch = dict(kwargs)

