"""DropBP inside training frameworks.

* :class:`DropBPCallback` (:mod:`dropbp_fx.integrations.transformers_trainer`): transformers' ``Trainer``
  (and TRL's trainers built on it). Needs transformers.
* :class:`DropBPLightningCallback` (:mod:`dropbp_fx.integrations.lightning`): PyTorch Lightning. Needs lightning.
* :mod:`dropbp_fx.integrations.common`: what every integration shares, framework-neutral: compile the model
  in place, drop statistics since the last log line, the step at which to calibrate.

Each framework's module is imported on first use, so that using one never needs another installed.
"""

from __future__ import annotations

import importlib

_LAZY = {"DropBPCallback": "dropbp_fx.integrations.transformers_trainer",
         "DropBPLightningCallback": "dropbp_fx.integrations.lightning"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
