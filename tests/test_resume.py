"""Checkpoint and resume: a run stopped at step k and resumed in a fresh model, a fresh ``torch.compile`` and a
fresh Dynamo draws the same masks and reaches bit for bit the same parameters as the uninterrupted run,
calibration (``CalibrationSchedule``) before or after the stop included. A drop state saved from another
model is refused with a clear error.

The recipe: ``torch.save`` the model's, the optimizer's, ``get_dropbp(compiled)``'s and the schedule's state
dicts; to resume, build ``dbp = dropbp_fx.DropBP(...)``, ``torch.compile(model, backend=dbp)`` and call
``dbp.load_state_dict(...)`` before the first forward (the first training forward draws a mask).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropbp_fx
from tests.test_runtime import Block

transformers = pytest.importorskip("transformers")

VOCAB = 96
OPTIONS = dict(drop_rate=0.5, seed=3, inner="eager")


def _llama(layers=2):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False)).train()


class BrokenNet(nn.Module):
    """Residual blocks with a graph break after the first: its gates reach the controller in two graphs."""

    def __init__(self, depth=4, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, labels):
        x = nn.functional.one_hot(input_ids, VOCAB).float()[..., :16]
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == 0:
                torch._dynamo.graph_break()
        return nn.functional.cross_entropy(self.head(x).flatten(0, 1), labels.flatten())


def _broken_net():
    torch.manual_seed(0)
    return BrokenNet()


def _batch(step):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(100 + step))
    return {"input_ids": ids, "labels": ids}


class Run:
    """One training process: a fresh Dynamo, model, DropBP, compiled model, optimizer and schedule."""

    def __init__(self, make_model, calibrate_at=None, total_steps=10):
        torch._dynamo.reset()
        self.model = make_model()
        self.dbp = dropbp_fx.DropBP(**OPTIONS)
        self.compiled = torch.compile(self.model, backend=self.dbp)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.schedule = None
        if calibrate_at is not None:
            self.schedule = dropbp_fx.CalibrationSchedule(self.compiled, total_steps, target=0.75,
                                                          fraction=calibrate_at / total_steps)
        self.masks, self.rates = [], []

    def train(self, start, stop):
        for step in range(start, stop):
            batch = _batch(step)
            if self.schedule is not None:
                self.schedule.step(batch)
            out = self.compiled(**batch)
            getattr(out, "loss", out).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.masks.append(self.dbp.last_mask)
            self.rates.append(self.dbp.rates)
        return self

    def save(self, path):
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(), "dropbp": self.dbp.state_dict(),
                    "schedule": None if self.schedule is None else self.schedule.state_dict()}, path)

    def load(self, path):
        checkpoint = torch.load(path)  # weights_only=True: every state is plain data
        self.model.load_state_dict(checkpoint["model"])
        self.opt.load_state_dict(checkpoint["opt"])
        self.dbp.load_state_dict(checkpoint["dropbp"])  # before the first forward
        if self.schedule is not None:
            self.schedule.load_state_dict(checkpoint["schedule"])
        return self


CASES = {  # model, stop, steps, calibration step
    "graph-break": (_broken_net, 2, 4, None),
    "calibrated-before-stop": (_llama, 3, 5, 2),
    "calibration-after-resume": (_llama, 2, 5, 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_is_bit_for_bit_the_uninterrupted_run(case, tmp_path):
    make_model, stop, steps, calibrate_at = CASES[case]
    whole = Run(make_model, calibrate_at).train(0, steps)

    first = Run(make_model, calibrate_at).train(0, stop)
    first.save(tmp_path / "checkpoint.pt")
    del first.compiled
    second = Run(make_model, calibrate_at).load(tmp_path / "checkpoint.pt").train(stop, steps)

    assert first.masks + second.masks == whole.masks
    assert first.rates + second.rates == whole.rates
    assert len({tuple(m.values()) for m in whole.masks}) > 1
    for (name, a), (_, b) in zip(second.model.named_parameters(), whole.model.named_parameters()):
        assert torch.equal(a, b), name
    assert second.dbp.step == whole.dbp.step == steps
    if calibrate_at is not None:
        assert len(set(map(str, whole.rates[calibrate_at:]))) == 1  # calibrated once, at calibrate_at
        assert whole.rates[calibrate_at] != whole.rates[calibrate_at - 1]
        assert str(second.schedule.result) == str(whole.schedule.result)


def test_drop_state_round_trips_calibrated_rates_and_schedule(tmp_path):
    run = Run(_llama, calibrate_at=1).train(0, 2)
    run.save(tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt")
    assert checkpoint["dropbp"] == {"seed": 3, "step": 2, "policy": "topup", "drop_rate": 0.5,
                                    "keep_one_open": "auto", "rates": run.dbp.rates,
                                    "schedule": {"kind": "constant", "total_steps": None, "ramp": 0.2,
                                                 "min_rate": 0.0, "max_rate": 0.95}}
    assert len(set(run.dbp.rates.values())) > 1  # per-gate rates from the calibration
    assert checkpoint["schedule"]["steps"] == 2 and checkpoint["schedule"]["at"] == 1
    assert [row[0] for row in checkpoint["schedule"]["result"]["rows"]] == run.dbp.gate_names


# --------------------------------------------------------------------------- another model's state
def _state_of(make_model):
    run = Run(make_model).train(0, 1)
    return run.dbp.state_dict()


def test_state_of_another_model_is_refused_after_compile():
    state = _state_of(_broken_net)
    run = Run(_llama).train(0, 1)
    before = run.dbp.state_dict()
    with pytest.raises(ValueError, match=r"saved from another model.*model\.layers\.0\.mlp.*blocks\.0\.mlp"):
        run.dbp.load_state_dict(state)
    assert run.dbp.state_dict() == before  # nothing loaded, no gate added


def test_state_of_another_model_is_refused_when_loaded_before_compile():
    state = _state_of(_broken_net)
    run = Run(_llama)
    run.dbp.load_state_dict(state)
    with pytest.raises(Exception, match=r"saved from another model.*does not name: \['model\.layers\.0"):
        run.train(0, 1)


def test_state_naming_gates_the_model_never_runs_is_refused_after_one_step():
    state = _state_of(lambda: _llama(layers=3))
    run = Run(_llama)
    run.dbp.load_state_dict(state)  # the 2-layer model's gates are all in the 3-layer state
    run.train(0, 1)  # nothing tells yet that the third layer's gates will never run
    with pytest.raises(ValueError, match=r"does not run: \['model\.layers\.2\.self_attn', 'model\.layers\.2\.mlp'\]"):
        run.train(1, 2)
