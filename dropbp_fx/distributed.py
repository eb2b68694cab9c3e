"""What ``DistributedDataParallel`` needs from DropBP: finding the wrapper, and refusing (with the fix) the
settings that cannot train with per-step masks before torch fails obscurely.

* Dynamo's DDPOptimizer cuts graphs at bucket boundaries, and so cuts residual branches apart;
* ``static_graph=True`` assumes the same parameters get gradients every step;
* ``find_unused_parameters=False`` expects a gradient for every parameter every step.
"""

from __future__ import annotations

DDP_OPTIMIZER_MESSAGE = (
    "dropbp: Dynamo's DDPOptimizer (torch._dynamo.config.optimize_ddp, on by default) has split this graph at "
    "DistributedDataParallel bucket boundaries, which cuts residual branches apart: dropbp would leave some of them "
    "ungated and train with other masks than you asked for. Fix: set torch._dynamo.config.optimize_ddp = False "
    "before the first forward. dropbp compiles the trunk segments and branches as separate pieces, so DDP still "
    "overlaps its gradient all-reduce with the backward pass.")


def ddp_class():
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DistributedDataParallel


def unwrap_ddp(module):
    """The model inside ``DistributedDataParallel`` wrappers (gate names must not depend on the wrapping)."""
    ddp = ddp_class()
    while ddp is not None and isinstance(module, ddp):
        module = module.module
    return module


def ddp_of(compiled):
    """The ``DistributedDataParallel`` of ``torch.compile(DDP(model))`` or ``DDP(torch.compile(model))``, if any."""
    ddp = ddp_class()
    from dropbp_fx._torch import orig_mod

    for module in (compiled, orig_mod(compiled)):
        if ddp is not None and isinstance(module, ddp):
            return module
    return None


def model_of(compiled):
    """The model whose parameter names the gates know: inside ``torch.compile`` and DDP wrappers."""
    model = unwrap_ddp(compiled)
    from dropbp_fx._torch import orig_mod

    return unwrap_ddp(orig_mod(model, model))


def active_ddp_module():
    """The ``DistributedDataParallel`` whose forward is running (DDP sets it around its module's forward)."""
    from dropbp_fx._torch import active_ddp_module as active

    ddp = ddp_class()
    return None if ddp is None else active(ddp)


def ddp_problem(ddp) -> str | None:
    """Why this DDP wrapper cannot train with branches dropped (None: it can)."""
    if getattr(ddp, "static_graph", False):
        return ("dropbp: DistributedDataParallel(static_graph=True) assumes the same parameters get gradients every "
                "step, but DropBP drops different residual branches each step (DDP fails at the second step). Fix: "
                "DistributedDataParallel(model, find_unused_parameters=True), without static_graph.")
    if not getattr(ddp, "find_unused_parameters", True):
        return ("dropbp: DistributedDataParallel(find_unused_parameters=False) expects a gradient for every "
                "parameter every step, but the parameters of a dropped residual branch get none (DDP would leave "
                "that step's gradient reduction unfinished and fail at the next one: 'Expected to have finished "
                "reduction in the prior iteration'). Fix: DistributedDataParallel(model, find_unused_parameters=True), or drop_rate=0.")
    return None
