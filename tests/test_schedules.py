"""Drop schedules, optimizer modes, recalibration and the automatic target.

Gradients are checked against the hook oracle (the eager model with the step's closed branches detached), the
optimizer modes against an independent AdamW on that oracle's gradients, resume bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx.auto import choose_target, step_time_line
from dropbp_fx.schedules import Schedule
from dropbp_fx.testing import detached
from tests.test_runtime import Block


class Net(nn.Module):
    def __init__(self, depth=4, d=16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def _net():
    torch.manual_seed(0)
    return Net()


def _x(step):
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(step))


# ---------------------------------------------------------------------- schedules
def test_named_schedules_have_their_shapes():
    up = Schedule("ramp_up", total_steps=100, ramp=0.2)
    values = [up.multiplier(t) for t in range(101)]
    assert values[0] == 0.0 and all(a <= b for a, b in zip(values, values[1:])) and values[20] > 0.99
    down = Schedule("ramp_down", total_steps=100, ramp=0.2)
    assert down.multiplier(79) == 1.0 and down.multiplier(90) == pytest.approx(0.5) and down.multiplier(100) == 0.0
    both = Schedule("ramp_up_down", total_steps=100, ramp=0.2)
    assert both.multiplier(50) == pytest.approx(up.multiplier(50)) and both.multiplier(100) == 0.0
    assert Schedule(lambda t: 0.5).rate(0.6, 3) == pytest.approx(0.3)
    clipped = Schedule(lambda t: 3.0, min_rate=0.1, max_rate=0.9)
    assert clipped.rate(0.5, 0) == 0.9 and clipped.rate(0.0, 0) == 0.0  # a gate at rate 0 stays open
    assert Schedule(lambda t: 0.0, min_rate=0.1).rate(0.5, 0) == 0.1


def test_a_ramp_without_the_run_length_says_how_to_give_it():
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("ramp_up").multiplier(3)
    with pytest.raises(ValueError, match="schedule"):
        dropbp_fx.DropBPConfig(schedule="linear")
    with pytest.raises(ValueError, match="optimizer_mode"):
        dropbp_fx.DropBPConfig(optimizer_mode="sgd")


def test_scheduled_masks_follow_the_rates_and_gradients_equal_the_oracle():
    model = _net()
    dbp = dropbp_fx.DropBP(0.75, inner="aot_eager", policy="bernoulli", schedule="ramp_up", total_steps=40,
                           ramp=0.5, keep_one_open=False)
    compiled = torch.compile(model, backend=dbp)
    reference = copy.deepcopy(model)
    dropped_early = dropped_late = 0
    for step in range(40):
        compiled(_x(step)).backward()
        closed = [n for n, d in dbp.last_mask.items() if d]
        with detached(reference, closed):
            reference(_x(step)).backward()
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            assert (p.grad is None) == (q.grad is None), (step, name)
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=f"step {step} {name}")
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        if step < 4:
            dropped_early += len(closed)
        elif step >= 36:
            dropped_late += len(closed)
    assert dbp.controller.rates_at(0) == [0.0] * 4 and dbp.controller.rates_at(39) == pytest.approx([0.75] * 4,
                                                                                                      abs=1e-3)
    assert dropped_early < dropped_late  # the ramp: few drops at the start, about 3 of 4 at the end


def _run(options, steps, start=0, state=None):
    torch._dynamo.reset()
    model = _net()
    dbp = dropbp_fx.DropBP(0.5, inner="eager", seed=5, **options)
    compiled = torch.compile(model, backend=dbp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dbp.attach_optimizer(opt)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        dbp.load_state_dict(state["dbp"])
    masks = []
    for step in range(start, steps):
        compiled(_x(step)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        masks.append(dict(dbp.last_mask))
    return model, opt, dbp, masks


@pytest.mark.parametrize("options", [dict(schedule="ramp_up_down", total_steps=12, ramp=0.4),
                                     dict(schedule="ramp_down", total_steps=12, optimizer_mode="lr_scale"),
                                     dict(optimizer_mode="zero")])
def test_resume_is_bit_exact_with_schedules_and_optimizer_modes(options, tmp_path):
    whole = _run(options, 12)
    first = _run(options, 5)
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "dbp": first[2].state_dict()},
               tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt")["dbp"]["schedule"]["kind"] == options.get("schedule", "constant")
    second = _run(options, 12, start=5, state=torch.load(tmp_path / "c.pt"))
    assert first[3] + second[3] == whole[3]
    assert len({tuple(m.values()) for m in whole[3]}) > 1
    for (name, a), (_, b) in zip(second[0].named_parameters(), whole[0].named_parameters()):
        assert torch.equal(a, b), name


def test_a_callable_schedule_must_be_passed_again_to_resume():
    dbp = dropbp_fx.DropBP(0.5, inner="eager", schedule=lambda t: 1.0)
    state = dbp.state_dict()
    assert state["schedule"]["kind"].startswith("callable:")
    with pytest.raises(ValueError, match="same callable"):
        dropbp_fx.DropBP(0.5, inner="eager").load_state_dict(state)


# ---------------------------------------------------------------------- optimizer modes
def _one_step(mode, step=1):
    """(params before, params after, the step's closed gates, grads) of step ``step`` under ``mode``."""
    model = _net()
    dbp = dropbp_fx.DropBP(0.5, inner="eager", policy="bernoulli", keep_one_open=False, optimizer_mode=mode,
                           lr_scale_cap=3.0)
    compiled = torch.compile(model, backend=dbp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    dbp.attach_optimizer(opt)
    for s in range(step + 1):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        compiled(_x(s)).backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        closed = [n for n, d in dbp.last_mask.items() if d]
        opt_state = copy.deepcopy(opt.state_dict())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, before, grads, closed, opt_state, dbp


def _plain_adamw(before, grads, opt_state):
    """An independent AdamW step on the oracle's parameters and gradients (None: skipped, as torch does)."""
    params = {n: nn.Parameter(v.clone()) for n, v in before.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2, weight_decay=0.1)
    opt.load_state_dict(opt_state)
    for n, p in params.items():
        p.grad = None if grads[n] is None else grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in params.items()}


def test_none_mode_leaves_dropped_branches_as_they_were():
    model, before, grads, closed, opt_state, _ = _one_step("none")
    assert closed
    for name, p in model.named_parameters():
        gate = next((g for g in closed if name.startswith(g + ".")), None)
        if gate is not None:
            assert grads[name] is None and torch.equal(p.detach(), before[name]), name


def test_zero_mode_gives_dropped_branches_zero_gradients_so_adamw_moves_them():
    model, before, grads, closed, opt_state, _ = _one_step("zero")
    zeroed = {n: (torch.zeros_like(before[n]) if g is None else g) for n, g in grads.items()}
    expected = _plain_adamw(before, zeroed, opt_state)
    moved = 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], msg=name)
        if any(name.startswith(g + ".") for g in closed):
            assert grads[name] is None
            moved += not torch.equal(p.detach(), before[name])  # weight decay and the first moment move it
    assert moved > 0


def test_lr_scale_mode_scales_kept_branch_updates_by_one_over_keep_rate():
    model, before, grads, closed, opt_state, dbp = _one_step("lr_scale")
    expected = _plain_adamw(before, grads, opt_state)
    gated = {n for g in dbp.controller.gates for n in g.params}
    checked = 0
    for name, p in model.named_parameters():
        if name in gated and grads[name] is not None:  # a kept branch: rate 0.5 -> scale 2 (cap 3)
            torch.testing.assert_close(p.detach(), before[name] + 2.0 * (expected[name] - before[name]), msg=name)
            checked += 1
        else:  # the trunk: plain AdamW; a dropped branch: not moved
            torch.testing.assert_close(p.detach(), expected[name], msg=name)
    assert checked > 0 and dbp.optimizer_links[0].scaled_steps == 2


# ---------------------------------------------------------------------- recalibration and the automatic target
def test_recalibration_runs_every_n_steps_on_several_batches_and_is_recorded():
    model = _net()
    dbp = dropbp_fx.DropBP(0.5, inner="eager")
    compiled = torch.compile(model, backend=dbp)
    schedule = dropbp_fx.CalibrationSchedule(compiled, total_steps=20, target=0.5, fraction=0.1, every=3, batches=2)
    for step in range(10):
        schedule.step(_x(step))
        compiled(_x(step)).backward()
        model.zero_grad(set_to_none=True)
    assert [s for s, _ in schedule.history] == [2, 5, 8]
    assert [s for s, _ in dbp.calibrations] == [2, 5, 8]  # dbp.step when each ran
    # the last calibration averaged the sensitivities of batches 7 and 8
    sens7, _ = dropbp_fx.sensitivities(compiled, _x(7))
    sens8, _ = dropbp_fx.sensitivities(compiled, _x(8))
    for row in schedule.result:
        assert row.sensitivity == pytest.approx((sens7[row.gate] + sens8[row.gate]) / 2)
    state = schedule.state_dict()
    assert state["every"] == 3 and state["history_steps"] == [2, 5, 8]


def test_step_time_line_fits_measured_steps_and_falls_back_without_spread():
    samples = [(d, 2.0 - 0.5 * d) for d in (0.0, 1.0, 2.0, 1.0, 3.0)] + [(1.0, 50.0)]  # one compile stall
    a, b = step_time_line(samples, total_bwd=4.0)
    assert a == pytest.approx(2.0) and b == pytest.approx(0.5)
    a, b = step_time_line([(1.0, 1.0)] * 5, total_bwd=4.0)
    assert a == 1.0 and b == pytest.approx(1.0 / 6.0)


def test_auto_target_maximises_estimated_progress_per_second_and_is_deterministic():
    sens, flops = [1.0] * 4, [1.0] * 4

    def allocate(t):
        return [t] * 4
    # uniform sensitivities, branch backward = 75% of a step: progress (1-t)^0.5 / (1 - 0.75 t) peaks at t = 2/3
    samples = [(d, 1.0 - 0.75 * d / 4) for d in (0.0, 1.0, 2.0, 3.0, 4.0)]
    t, rates, info = choose_target(sens, flops, samples, allocate, ceiling=0.9)
    assert t == pytest.approx(0.65) and rates == [0.65] * 4
    assert choose_target(sens, flops, samples, allocate, ceiling=0.9)[0] == t
    # branch backward only 20% of a step: dropping cannot pay for the lost signal
    cheap = [(d, 1.0 - 0.2 * d / 4) for d in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert choose_target(sens, flops, cheap, allocate)[0] == 0.0


def test_calibrate_auto_applies_the_chosen_target():
    model = _net()
    dbp = dropbp_fx.DropBP(0.5, inner="eager")
    compiled = torch.compile(model, backend=dbp)
    for step in range(6):
        compiled(_x(step)).backward()
        model.zero_grad(set_to_none=True)
    table = dropbp_fx.calibrate(compiled, _x(9), target="auto")
    assert isinstance(table.target, float) and 0.0 <= table.target <= 0.9
    assert table.auto["progress_per_s"][table.target] == max(table.auto["progress_per_s"].values())
    assert dbp.rates == {r.gate: r.rate for r in table}
