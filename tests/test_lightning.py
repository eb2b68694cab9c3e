"""DropBP under PyTorch Lightning: real ``Trainer.fit`` runs on CPU, resume with the same masks, optional imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from dropbp_fx.integrations.lightning import DropBPLightningCallback  # noqa: E402

from tests.small_nets import Regressor, regression_data  # noqa: E402


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Regressor()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def _data(n=192):
    return torch.utils.data.DataLoader(regression_data(n), batch_size=16, shuffle=False)


class Masks(pl.Callback):
    """The mask of every training step (after DropBP's callback has drawn it)."""

    def __init__(self, dropbp):
        self.dropbp, self.masks, self.losses = dropbp, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.masks[trainer.global_step] = tuple(self.dropbp.last_mask.values())
        self.losses[trainer.global_step] = float(outputs["loss"])


def _fit(tmp_path, max_steps, callback, ckpt_path=None, **trainer_kwargs):
    torch._dynamo.reset()
    masks = Masks(callback.dropbp)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[callback, masks], **trainer_kwargs)
    module = Regression()
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer, module, masks


def test_fit_trains_with_dropbp_logs_and_calibrates(tmp_path):
    callback = DropBPLightningCallback(drop_rate=0.5, calibrate="fast", calibrate_at=0.25, inner="eager")
    trainer, module, masks = _fit(tmp_path, 24, callback)
    dbp = callback.dropbp
    assert dbp.gate_names == [f"blocks.{i}.mlp" for i in range(3)] or \
        dbp.gate_names == [f"blocks.{i}" for i in range(3)], dbp.gate_names
    assert dbp.step == 24 and callback.network is module.model
    losses = list(masks.losses.values())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert {"dropbp_drop_fraction", "dropbp_bwd_flops_saved"} <= set(trainer.callback_metrics)
    dropped = sum(d for d, _ in dbp.counts().values())
    assert 0.2 < dropped / (24 * 3) < 0.9
    assert callback.calibrated and len(set(dbp.rates.values())) > 1  # calibrated at step 6: per-gate rates
    png = (tmp_path / "dropbp_gates.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_resume_from_a_lightning_checkpoint_draws_the_same_masks(tmp_path):
    options = dict(drop_rate=0.5, calibrate=None, inner="eager", seed=5, policy="bernoulli", plot=False)
    _, _, whole = _fit(tmp_path / "whole", 12, DropBPLightningCallback(**options))

    first = DropBPLightningCallback(**options)
    trainer, _, part = _fit(tmp_path / "part", 6, first)
    ckpt = tmp_path / "step6.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = DropBPLightningCallback(**options)
    _, _, rest = _fit(tmp_path / "part", 12, resumed, ckpt_path=str(ckpt))
    assert resumed.dropbp.step == 12
    assert {**part.masks, **rest.masks} == whole.masks
    assert len(set(whole.masks.values())) > 2  # the masks vary from step to step


def test_lightning_and_transformers_stay_optional():
    """Each callback imports its own framework only (torchmetrics, under Lightning, may import transformers itself:
    what is checked is that dropbp_fx does not)."""
    no_lightning = ("import sys; from dropbp_fx.integrations import DropBPCallback; import dropbp_fx; "
                    "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)")
    no_trainer = ("import sys; from dropbp_fx.integrations import DropBPLightningCallback; import dropbp_fx; "
                  "assert 'dropbp_fx.integrations.transformers_trainer' not in sys.modules")
    for code in (no_lightning, no_trainer):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
