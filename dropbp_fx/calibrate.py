"""Sensitivity-based drop rates in one call.

``dropbp_fx.calibrate(compiled, batch, target=0.75)`` measures how much each gated
branch matters, reads each branch's backward FLOPs from the graph, spends the FLOPs
budget of the target rate on per-gate rates (:mod:`dropbp_fx.allocate`) and applies
them. Sensitivity, as in the paper: with branch ``i`` alone dropped, on the same batch,

    C_i = sum over parameter tensors of (||g_ref|| - ||g_drop_i||)^2.

``method="exact"`` computes that with N+1 backward passes. ``method="fast"`` estimates
it from one backward pass, read by the gates while ``controller.recording()`` is on (:mod:`dropbp_fx.probe`):

* the branch's own parameters lose their whole gradient: ``sum ||g_p||^2`` over them;
* every parameter below the branch loses the part of its gradient that came through
  the branch. The probes give the branch's share of the stream gradient,
  ``r_i^2 = ||grad through the branch||^2 / ||grad of the stream at its input||^2``,
  and that share of the upstream parameters' squared gradient norms is the estimate.

Neither changes the global RNG state (each pass replays the same randomness, so dropout
draws the same masks, then the state is restored), leaves anything in ``.grad``, touches
the parameters or the mode of the model, or advances the drop schedule.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dropbp_fx.allocate import allocate_rates
from dropbp_fx.auto import choose_target
from dropbp_fx.discovery import get_dropbp
from dropbp_fx.rng import same_randomness
from dropbp_fx.distributed import ddp_of, model_of

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Method:
    """A way to measure sensitivities: ``estimate(controller, model, params, reference_norms, grad_norms)``
    after one reference backward pass (recorded by the gates when ``records``), in ``passes(gates)`` passes."""

    estimate: Callable
    records: bool
    passes: Callable[[int], int]


METHODS: dict[str, Method] = {}  # filled below the estimators; a new method is one entry


@dataclass
class CalibrationRow:
    gate: str
    flops_share: float
    sensitivity: float
    rate: float


class Calibration(list):
    """Rows of (gate, FLOPs share, sensitivity, rate); prints as a table."""

    method: str = ""
    backward_passes: int = 0
    target: float = 0.0

    def __str__(self) -> str:
        width = max([len(r.gate) for r in self] + [4])
        lines = [f"{'gate':<{width}}  bwd FLOPs share  sensitivity  rate"]
        lines += [f"{r.gate:<{width}}  {r.flops_share:15.1%}  {r.sensitivity:11.4g}  {r.rate:.3f}" for r in self]
        lines.append(f"target {self.target}, method {self.method} ({self.backward_passes} backward passes)")
        return "\n".join(lines)


def _loss_fn(compiled, batch_or_closure) -> Callable[[], torch.Tensor]:
    if callable(batch_or_closure) and not isinstance(batch_or_closure, (torch.Tensor, dict, list, tuple)):
        return batch_or_closure

    def loss():
        if isinstance(batch_or_closure, dict):
            out = compiled(**batch_or_closure)
        elif isinstance(batch_or_closure, (list, tuple)):
            out = compiled(*batch_or_closure)
        else:
            out = compiled(batch_or_closure)
        out = getattr(out, "loss", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ValueError("calibrate: the batch must make the model return a scalar loss (or an output with "
                             ".loss); pass a closure `lambda: loss_fn(compiled(batch))` instead")
        return out
    return loss


def _model_of(compiled) -> nn.Module:
    """The model whose parameter names the gates know: inside ``torch.compile`` and DDP wrappers."""
    model = model_of(compiled)
    if not isinstance(model, nn.Module):
        raise TypeError("calibrate needs the compiled model (torch.compile(model, backend='dropbp'))")
    return model


def sensitivities(compiled, batch_or_closure, method: str = "fast") -> tuple[dict[str, float], int]:
    """Gate name -> sensitivity, and the number of backward passes it took."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    dbp = get_dropbp(compiled)
    model = _model_of(compiled)
    loss_fn = _loss_fn(compiled, batch_or_closure)
    controller = dbp.controller
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("calibrate: no parameter requires grad, so there is no gradient to measure")

    def grad_norms(dropped: int | None) -> list[float]:
        with controller.forcing({} if dropped is None else {dropped: True}):
            replay()
            loss = loss_fn()
            if not loss.requires_grad:
                raise ValueError("calibrate: the loss does not require grad on this batch (nothing trainable "
                                 "reaches it); use a batch that trains the model")
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        return [0.0 if g is None else float(g.detach().float().norm()) for g in grads]

    ddp = ddp_of(compiled)
    with same_randomness() as replay, (ddp.no_sync() if ddp is not None else contextlib.nullcontext()):
        with controller.recording() if METHODS[method].records else contextlib.nullcontext():
            reference = grad_norms(None)
        if not controller.gates:
            raise LookupError("calibrate: the model has no gates: the training step just run reached no residual "
                              "branch the backend could gate (see the DropBPWarning above, or "
                              "dropbp_fx.explain(model, *inputs) for every add and why it was not gated)")
        result = METHODS[method].estimate(controller, model, params, reference, grad_norms)
    return result, METHODS[method].passes(len(controller.gates))


def _exact(controller, model, params, reference, grad_norms) -> dict[str, float]:
    """The paper's definition: each gate alone closed, one backward pass each."""
    result = {}
    for slot, gate in enumerate(controller.gates):
        dropped = grad_norms(slot)
        result[gate.name] = sum((a - b) ** 2 for a, b in zip(reference, dropped))
    return result


def _fast(controller, model, params, reference, grad_norms) -> dict[str, float]:
    """From the reference pass alone, through the gradients the gates recorded."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    tied = {name for name, p in params if seen[id(p)] > 1}
    return _fast_estimate(controller, params, reference, tied)


def _fast_estimate(controller, params, reference, tied: set[str]) -> dict[str, float]:
    """``tied`` parameters (input embeddings shared with the output head) are left out of the upstream sums:
    most of their gradient comes from the head, which dropping a branch does not change."""
    squared = {name: norm ** 2 for (name, _), norm in zip(params, reference) if name not in tied}
    order = {name: i for i, (name, _) in enumerate(params)}
    result = {}
    for slot, gate in enumerate(controller.gates):
        own = [n for n in gate.params if n in squared]
        first = min((order[n] for n in own), default=len(order))
        upstream = sum(sq for n, sq in squared.items() if order[n] < first and n not in gate.params)
        through = controller.recorder.sums.get((slot, "in"), 0.0)
        stream = controller.recorder.sums.get((slot, "out"), 0.0) + through
        share = through / stream if stream > 0 else 0.0
        result[gate.name] = sum(squared[n] for n in own) + share * upstream
    return result


def _mean_over_ranks(sens: dict[str, float], ddp) -> dict[str, float]:
    """Under DDP every rank must draw the same masks, so use the same rates: each rank measured its own
    batch, and all of them allocate from the mean of the sensitivities."""
    if ddp is None:
        return sens
    names = sorted(sens)
    device = next(ddp.module.parameters()).device
    values = torch.tensor([sens[n] for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(values, group=ddp.process_group)
    values /= torch.distributed.get_world_size(ddp.process_group)
    return dict(zip(names, values.tolist()))


def calibrate(compiled, batch_or_closure, target: float = 0.75, *, method: str = "fast",
              allocator: str = "optimal", min_rate: float = 0.0, max_rate: float = 0.95,
              more_batches=()) -> Calibration:
    """Measure sensitivities, allocate per-gate rates for ``target`` and apply them; returns the table.

    ``more_batches``: further batches (or closures); the sensitivities are the mean over all of them. Every
    calibration is recorded in ``get_dropbp(compiled).calibrations`` as ``(step, table)``.

    Under ``DistributedDataParallel``, call it on every rank (``CalibrationSchedule`` does, at the same step):
    the sensitivities are averaged over the ranks, so that every rank gets the same rates and masks.
    """
    dbp = get_dropbp(compiled)
    sens, passes = sensitivities(compiled, batch_or_closure, method)
    for more in more_batches:
        extra, more_passes = sensitivities(compiled, more, method)
        sens = {name: value + extra[name] for name, value in sens.items()}
        passes += more_passes
    sens = {name: value / (1 + len(more_batches)) for name, value in sens.items()}
    sens = _mean_over_ranks(sens, ddp_of(compiled))
    gates = dbp.controller.gates
    missing = [g.name for g in gates if not g.flops]
    flops = [g.flops[1] if g.flops else 1.0 for g in gates]
    if missing:
        log.warning("dropbp: no FLOPs for %s (no shapes in the graph); counting them as equal", missing)
    values = [sens[g.name] for g in gates]

    def allocate(t: float) -> list[float]:
        return allocate_rates(values, flops, t, method=allocator, min_rate=min_rate, max_rate=max_rate)

    chosen = None
    if target == "auto":  # dropbp_fx.auto: the target of the most progress per second, from this run's figures
        target, rates, chosen = choose_target(values, flops, list(dbp.controller.step_times), allocate,
                                              floor=min_rate, ceiling=min(max_rate, 0.9))
        log.info("dropbp: auto target %.2f (step time %.3f s - %.3g s per dropped backward FLOP)", target,
                 chosen["a"], chosen["b"])
    else:
        rates = allocate(target)
    dbp.set_rates({g.name: r for g, r in zip(gates, rates)})
    total = sum(flops)
    table = Calibration(CalibrationRow(g.name, f / total, sens[g.name], r) for g, f, r in zip(gates, flops, rates))
    table.method, table.backward_passes, table.target = method, passes, target
    table.auto = chosen
    dbp.calibrations.append((dbp.step, table))
    log.info("dropbp: calibrated %d gates (%s, %d backward passes) for target %.3f", len(gates), method, passes,
             target)
    return table


def calibration_step(fraction: float, total_steps: int) -> int:
    """The step at which the rates are calibrated: ``fraction`` of training (the paper: 10%)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    return int(fraction * total_steps)


class CalibrationSchedule:
    """Calibrate at ``fraction`` of ``total_steps`` (10% by default, as the paper does), then, with ``every``,
    again every ``every`` steps; with ``batches`` > 1 each calibration averages the sensitivities of the last
    ``batches`` batches seen (``history`` lists ``(step, table)`` of each).

    Call :meth:`step` once per training step with that step's batch (or a loss closure)::

        schedule = dropbp_fx.CalibrationSchedule(compiled, total_steps=1000, target=0.75)
        for batch in loader:
            schedule.step(batch)       # calibrates at step 100; rates stay uniform before
            loss = compiled(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, compiled, total_steps: int, *, target: float = 0.75, fraction: float = 0.1,
                 method: str = "fast", every: int | None = None, batches: int = 1, **kwargs) -> None:
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"CalibrationSchedule every must be None or a positive int (steps), got {every!r}")
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
            raise ValueError(f"CalibrationSchedule batches must be a positive int, got {batches!r}")
        self.compiled, self.at = compiled, calibration_step(fraction, total_steps)
        self.target, self.method, self.kwargs = target, method, kwargs
        self.every, self.batches = every, batches
        self.steps, self.result = 0, None
        self.history: list[tuple[int, Calibration]] = []
        self._recent: list = []

    def due(self) -> bool:
        """Does the next :meth:`step` calibrate?"""
        if self.steps < max(1, self.at):
            return False
        if self.result is None:
            return True
        return self.every is not None and (self.steps - self.history[-1][0]) >= self.every

    def step(self, batch_or_closure) -> Calibration | None:
        """Calibrate if due (on this batch and the ``batches - 1`` before it); returns the latest table."""
        self._recent = (self._recent + [batch_or_closure])[-self.batches:]
        if self.due():
            self.result = calibrate(self.compiled, self._recent[-1], self.target, method=self.method,
                                    more_batches=self._recent[:-1], **self.kwargs)
            self.history.append((self.steps, self.result))
        self.steps += 1
        return self.result

    def state_dict(self) -> dict:
        """Where the schedule stands: steps seen, the calibration step, and the table once calibrated.

        Plain Python values (``torch.load(..., weights_only=True)`` reads them). The rates the calibration set
        are in ``get_dropbp(compiled).state_dict()``: save and load both to resume.
        """
        result = None if self.result is None else {
            "rows": [(r.gate, r.flops_share, r.sensitivity, r.rate) for r in self.result],
            "method": self.result.method, "backward_passes": self.result.backward_passes,
            "target": self.result.target}
        return {"steps": self.steps, "at": self.at, "result": result, "every": self.every,
                "history_steps": [step for step, _ in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.at = int(state["steps"]), int(state["at"])
        self.every = state.get("every", self.every)
        self.result = None
        if state["result"] is not None:
            saved = state["result"]
            self.result = Calibration(CalibrationRow(*row) for row in saved["rows"])
            self.result.method, self.result.backward_passes = saved["method"], saved["backward_passes"]
            self.result.target = saved["target"]
            steps = state.get("history_steps") or [self.at]
            self.history = [(step, self.result) for step in steps[-1:]]  # the tables before the last are not kept


METHODS.update({"fast": Method(_fast, records=True, passes=lambda gates: 1),
                "exact": Method(_exact, records=False, passes=lambda gates: gates + 1)})
