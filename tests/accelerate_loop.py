"""A plain training loop under ``accelerate`` with DropBP (run by tests/test_accelerate.py, one process or through
``accelerate launch --num_processes 2 --cpu``): writes each rank's masks and losses to ``OUT/rank{i}.json``.

    python tests/accelerate_loop.py OUT [before|after]     # compile before or after accelerator.prepare
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn

import dropbp_fx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from tests/
from tests.small_nets import Regressor, regression_data  # noqa: E402


class Net(Regressor):
    def forward(self, x, y):
        return nn.functional.mse_loss(super().forward(x), y)


def main(out: str, order: str) -> None:
    # dropbp needs DDP to accept parameters without a gradient (dropped branches), and Dynamo's DDPOptimizer off
    torch._dynamo.config.optimize_ddp = False
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    torch.manual_seed(0)
    model = Net()
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=16, shuffle=False)
    options = {"inner": "eager", "seed": 3, "drop_rate": 0.5}
    if order == "before":
        model = torch.compile(model, backend="dropbp", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    compiled = torch.compile(model, backend="dropbp", options=options) if order == "after" else model
    masks, losses = [], []
    for step, (xb, yb) in enumerate(loader):
        loss = compiled(xb, yb)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        dbp = dropbp_fx.get_dropbp(compiled)
        masks.append(list(dbp.last_mask.values()))
        losses.append(float(loss.detach()))
        if step == 7:
            break
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump({"gates": dbp.gate_names, "masks": masks, "losses": losses,
                   "world": accelerator.num_processes, "step": dbp.step}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "after")
