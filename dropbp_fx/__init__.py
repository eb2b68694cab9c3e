"""dropbp-fx: DropBP for any PyTorch model through ``torch.compile(model, backend="dropbp")``.

Public API::

    compiled = torch.compile(model, backend="dropbp", options={"drop_rate": 0.5})
    dropbp_fx.get_dropbp(compiled)          # gate names, rates, last mask, counts, summary()

    dbp = dropbp_fx.compile(model, drop_rate=0.5)  # in place; gradient checkpointing gated too

    dbp = dropbp_fx.DropBP(drop_rate=0.5)   # or keep the backend object yourself
    compiled = torch.compile(model, backend=dbp)

    gm = dbp.transform(torch.fx.symbolic_trace(model))   # the passes on any traced GraphModule

    print(dropbp_fx.explain(model, **batch))  # what would be rewritten, without training

    Trainer(..., callbacks=[dropbp_fx.integrations.DropBPCallback(drop_rate=0.75)])  # transformers
"""

from dropbp_fx.backend import DropBP
from dropbp_fx.calibrate import Calibration, CalibrationSchedule, calibrate, sensitivities
from dropbp_fx.config import DropBPConfig, validate_options
from dropbp_fx.controller import DropController
from dropbp_fx.discovery import get_dropbp
from dropbp_fx.explain import Explanation, explain
from dropbp_fx.gate import DropGate
from dropbp_fx.reports import DropBPWarning
from dropbp_fx.tracing import compile  # noqa: A004 - dropbp_fx.compile(model, **options), in place

__all__ = ["Calibration", "CalibrationSchedule", "DropBP", "DropBPConfig", "DropBPWarning", "DropController", "DropGate",
           "Explanation", "calibrate", "compile", "explain", "get_dropbp", "sensitivities", "validate_options"]
__version__ = "0.1.0"
