"""``recompute=True``: a kept branch stores no activations and runs again in backward, per gate.

Gradients equal the hook oracle under every inner compiler; dropout in a recomputed branch replays the
forward's randomness; the bytes held for backward go down; the recompute draws no mask and asks the
controller nothing."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx.gate import DropGate
from dropbp_fx.testing import assert_same_grads, detached, grads

transformers = pytest.importorskip("transformers")

from tests.test_inner import _oracle_steps  # noqa: E402
from tests.test_transformers import MODELS  # noqa: E402


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_recompute_matches_hook_oracle_on_llama(inner):
    dbp = _oracle_steps("llama", inner, steps=4, recompute=True)  # the oracle on every step; masks vary
    assert dbp.step == 4  # one mask per step: the recompute in backward drew none
    assert all(calls == 4 for _, calls in dbp.counts().values())  # the controller saw forward calls only


class _DropoutBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.5), nn.Linear(4 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _DropoutNet(nn.Module):
    def __init__(self, depth=3, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(_DropoutBlock(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x).sum()


def _dropout_grads(inner, recompute, rng_seed, steps=3):
    torch.manual_seed(0)
    net = _DropoutNet().train()
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=1, inner=inner, recompute=recompute, keep_one_open=True)
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(8, 16)
    out = []
    for step in range(steps):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(rng_seed + step)
        compiled(x).backward()
        out.append((dict(dbp.last_mask), grads(net)))
    return out


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_dropout_in_a_recomputed_branch_replays_the_forward_randomness(inner):
    """The recompute restores the RNG state of the forward: the gradients are those of the same step run
    without recompute (under eager, also those of the original module with the same branches detached).
    Without the replay the recomputed dropout mask would differ and so would every kept branch's gradient."""
    with_recompute = _dropout_grads(inner, True, rng_seed=10)
    without = _dropout_grads(inner, False, rng_seed=10)
    other_rng = _dropout_grads(inner, False, rng_seed=99)
    for (mask, g), (mask_ref, g_ref), (_, g_other) in zip(with_recompute, without, other_rng):
        assert mask == mask_ref
        assert_same_grads(g, g_ref, rtol=1e-5, atol=1e-6)
        kept = [n for n in g if g[n] is not None and n.startswith("blocks") and ".mlp.0." in n]
        assert kept, "the test needs a kept branch"
        # the dropout is live: another RNG stream gives other gradients for the kept branches
        assert any(not torch.allclose(g[n], g_other[n]) for n in kept)
    if inner == "eager":  # the original module, eagerly, with the same RNG stream and the chosen blocks detached
        torch.manual_seed(0)
        oracle = _DropoutNet().train()
        x = torch.randn(8, 16)
        for step, (mask, g) in enumerate(with_recompute):
            oracle.zero_grad(set_to_none=True)
            with detached(oracle, [name for name, d in mask.items() if d]):
                torch.manual_seed(10 + step)
                oracle(x).backward()
            assert_same_grads(g, grads(oracle), rtol=1e-5, atol=1e-6)


def _saved_activation_bytes(compiled, model, batch) -> int:
    """Bytes autograd holds for backward at the end of the forward: each storage once, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: list = []

    class Box:
        __slots__ = ("t", "__weakref__")

        def __init__(self, t):
            self.t = t

    def pack(t):
        box = Box(t.detach())
        held.append((weakref.ref(box), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.t):
        loss = compiled(**batch).loss
    live = {ptr: n for ref, ptr, n in held if ref() is not None and ptr not in params}
    loss.backward()
    return sum(live.values())


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_recompute_holds_fewer_bytes_for_backward(inner):
    """Every gate open (rate 0): with recompute the kept branches hold their inputs only."""
    factory = MODELS["llama"][0]
    ids = torch.randint(0, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    saved = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        model = factory().train()
        model.config.use_cache = False
        compiled = torch.compile(model, backend=dropbp_fx.DropBP(drop_rate=0.0, inner=inner, recompute=recompute))
        compiled(**batch).loss.backward()  # compile
        saved[recompute] = _saved_activation_bytes(compiled, model, batch)
    assert saved[True] < 0.6 * saved[False], saved


def test_the_recompute_asks_the_controller_nothing_and_runs_each_kept_branch_twice():
    torch.manual_seed(0)
    net = _DropoutNet(depth=4)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=2, inner="aot_eager", recompute=True)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(dbp(gm, example_inputs))
        return graphs[-1]
    compiled = torch.compile(net, backend=backend)
    x = torch.randn(8, 16)
    compiled(x).backward()
    gates = [m for gm in graphs for m in gm.modules() if isinstance(m, DropGate)]
    assert gates and all(g.recompute for g in gates)
    runs: dict[int, int] = {}
    in_backward = []
    for g in gates:  # the open variant (a compiled piece of its own) counts its calls
        g.run_open.register_forward_pre_hook(lambda _m, _a, slot=g.slot: runs.update({slot: runs.get(slot, 0) + 1}))
    is_dropped = dbp.controller.is_dropped

    def spy(slot):
        in_backward.append(torch._C._current_graph_task_id() != -1)
        return is_dropped(slot)
    dbp.controller.is_dropped = spy
    for _ in range(4):
        step = dbp.step
        runs.clear()
        loss = compiled(x)
        mask = list(dbp.last_mask.values())
        assert runs == {slot: 1 for slot, dropped in enumerate(mask) if not dropped}
        loss.backward()
        assert dbp.step == step + 1
        assert list(dbp.last_mask.values()) == mask
        assert runs == {slot: 2 for slot, dropped in enumerate(mask) if not dropped}  # again in backward
    assert in_backward and not any(in_backward)


def test_recompute_is_an_option_with_a_check():
    assert dropbp_fx.DropBPConfig().recompute is False
    with pytest.raises(ValueError, match="recompute"):
        dropbp_fx.DropBPConfig(recompute="yes")
