"""Bad input: every case gets an error or a warning that names the problem and the fix."""

from __future__ import annotations

import copy
import random

import warnings

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx.backend import DropBPWarning
from dropbp_fx.testing import assert_same_grads, detached, grads


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, depth=4, block=Block):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(depth))
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x).pow(2).mean()


def _compiled(**options):
    torch.manual_seed(0)
    net = Net()
    compiled = torch.compile(net, backend="dropbp", options={"inner": "eager", **options})
    compiled(torch.randn(4, 8)).backward()  # Dynamo compiles lazily: the gates exist after the first call
    return net, compiled


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, float("nan"), "0.5"])
def test_drop_rate_outside_0_1(rate):
    message = r"drop_rate must be a number in \[0, 1\) \(0 = never drop\)"
    with pytest.raises(ValueError, match=message):
        dropbp_fx.DropBP(drop_rate=rate)
    with pytest.raises(Exception, match=message):  # through torch.compile: raised on the first call
        torch.compile(Net(), backend="dropbp", options={"drop_rate": rate})(torch.randn(2, 8))


def test_unknown_option_key_lists_the_valid_ones():
    with pytest.raises(Exception, match=r"unknown option\(s\) \['droprate'\]. Valid options:\n  drop_rate: float"):
        torch.compile(Net(), backend="dropbp", options={"droprate": 0.5})(torch.randn(2, 8))


def test_unknown_inner_compiler():
    with pytest.raises(ValueError, match=r"inner must be one of \('eager', 'aot_eager', 'inductor'\), another Dynamo "
                                         r"backend name .* or a callable .*; got 'tvmm'"):
        dropbp_fx.DropBP(inner="tvmm")
    with pytest.raises(ValueError, match="inner cannot be 'dropbp' itself"):
        dropbp_fx.DropBP(inner="dropbp")


def test_inner_compiler_is_any_dynamo_backend_or_callable():
    """Besides the three tested names: a Dynamo backend by name (``aot_eager_default_partitioner``), or a callable."""
    calls = []

    def my_compiler(gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return gm

    for inner in ("aot_eager_default_partitioner", my_compiler):
        torch._dynamo.reset()
        model = Net()
        dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner)
        x = torch.randn(2, 8)
        out = torch.compile(model, backend=dbp)(x)
        assert torch.allclose(out, model(x)) and dbp.gate_names and dbp.compile_cache.compiles > 0
    assert calls  # the callable compiled the pieces
    torch._dynamo.reset()


def test_mode_instead_of_options():
    with pytest.raises(Exception, match=r"dropbp takes options=\{...\}, not mode='max-autotune'"):
        torch.compile(Net(), backend="dropbp", mode="max-autotune")(torch.randn(2, 8))


# ---------------------------------------------------------------- rates and calibration
def test_rate_list_of_the_wrong_length():
    _, compiled = _compiled()
    dbp = dropbp_fx.get_dropbp(compiled)
    with pytest.raises(ValueError, match=r"got 3 rates for 4 gates \['blocks.0.mlp'.*pass one rate per gate, in "
                                         r"this order, or a dict by gate name"):
        dbp.set_rates([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"unknown gate names \['blocks.9.mlp'\]; the gates are"):
        dbp.set_rates({"blocks.9.mlp": 0.5})
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
        dbp.set_rates([0.5, 0.5, 0.5, 1.0])
    assert list(dbp.rates.values()) == [0.5] * 4  # nothing was applied


def test_unreachable_calibration_targets():
    _, compiled = _compiled()
    batch = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"target = 0.99 must be in \[0, 0.95\]"):
        dropbp_fx.calibrate(compiled, batch, target=0.99)
    with pytest.raises(ValueError, match=r"target 0.8 is not reachable: with these max_rate values the FLOPs-weighted "
                                         r"drop rate is at most 0.6; raise max_rate or lower the target"):
        dropbp_fx.calibrate(compiled, batch, target=0.8, max_rate=0.6)


def test_calibration_batch_without_gradient():
    net, compiled = _compiled()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"the loss does not require grad on this batch .* use a batch that trains"):
        dropbp_fx.calibrate(compiled, lambda: compiled(x).detach())
    vector = torch.compile(_Vector(net), backend=dropbp_fx.DropBP(inner="eager"))
    vector(x).sum().backward()
    with pytest.raises(ValueError, match=r"must make the model return a scalar loss .* pass a closure"):
        dropbp_fx.calibrate(vector, x)


class _Vector(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.blocks = net.blocks

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_calibration_before_the_first_step():
    compiled = torch.compile(Net(), backend=dropbp_fx.DropBP(inner="eager"))
    with pytest.raises(LookupError, match=r"no dropbp state for this model: .* run one forward first"):
        dropbp_fx.calibrate(compiled, torch.randn(4, 8))


# ---------------------------------------------------------------- models
def test_model_without_residual_branch_warns_and_trains_unchanged():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1))
    reference = copy.deepcopy(mlp)
    x = torch.randn(4, 8)
    with pytest.warns(DropBPWarning, match=r"graph 0 has no residual branch .* nothing in it is ever dropped .* "
                                           r"dropbp_fx.explain\(model, \*inputs\) lists every add"):
        torch.compile(mlp, backend="dropbp", options={"inner": "eager"})(x).sum().backward()
    reference(x).sum().backward()
    assert_same_grads(grads(mlp), grads(reference))


class InPlaceBlock(Block):
    """The branch scales the residual stream in place before reading it: the skip sees the scaled value too."""

    def forward(self, x):
        return x + self.mlp(self.norm(x.mul_(0.5)))


def test_in_place_mutation_of_the_branch_input_warns_and_keeps_oracle_gradients():
    torch.manual_seed(0)
    net = Net(block=InPlaceBlock)
    oracle = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=1, inner="eager")
    compiled = torch.compile(net, backend=dbp)
    x = torch.randn(4, 8)
    mixed = 0
    for step in range(4):
        net.zero_grad(set_to_none=True)
        if step == 0:
            with pytest.warns(DropBPWarning, match=r"residual stream of branch 'blocks.0.mlp' is modified in place "
                                                   r"\(mul_ = mul_\).*use the out-of-place op"):
                compiled(x.clone()).backward()
        else:
            compiled(x.clone()).backward()
        dropped = [g for g, d in dbp.last_mask.items() if d]
        mixed += 0 < len(dropped) < 4
        oracle.zero_grad(set_to_none=True)
        with detached(oracle, dropped):
            oracle(x.clone()).backward()
        assert_same_grads(grads(net), grads(oracle))
    assert mixed


class PublishedDropBP(nn.Module):
    """The published library's layer (``dropbp.layer.DropBP``), as its README has users insert it."""

    def __init__(self, flops, p=0):
        super().__init__()
        self.p, self.flops, self.count, self.is_detach = p, flops, 0, True

    def forward(self, input):
        if not self.training or random.random() <= 1 - self.p:
            return input
        self.count += 1
        return input.detach()


PublishedDropBP.__name__ = "DropBP"


class HandEditedBlock(Block):
    def __init__(self):
        super().__init__()
        self.dropbp_mlp = PublishedDropBP(flops=1.0, p=0.5)

    def forward(self, x):
        return x + self.dropbp_mlp(self.mlp(self.norm(x)))


def test_model_already_wrapped_by_the_published_dropbp_layers():
    with pytest.raises(Exception, match=r"already contains layers of the published DropBP library \(blocks.0.dropbp_mlp"
                                        r", blocks.1.dropbp_mlp, blocks.2.dropbp_mlp, blocks.3.dropbp_mlp\).*"
                                        r"Use the unmodified model"):
        torch.compile(Net(block=HandEditedBlock), backend="dropbp", options={"inner": "eager"})(torch.randn(2, 8))


class BrokenBranch(nn.Module):
    """A branch with a data-dependent ``.item()`` in the middle (JetMoE's routing): Dynamo breaks the graph
    there, so no graph holds the whole ``x + f(x)``."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)

    def forward(self, x):
        h = self.fc1(x)
        scale = 1 + int((h > 0).sum().item()) % 2
        return x + self.fc2(torch.relu(h)) * scale


class BrokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BrokenBranch() for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_branch_cut_by_a_graph_break_is_named_with_the_op_and_the_fix():
    torch.manual_seed(0)
    net, x = BrokenNet(), torch.randn(4, 8)
    torch._dynamo.reset()
    with pytest.warns(DropBPWarning, match=r"ends inside a residual branch, at blocks\.0\.fc1: Dynamo broke the "
                                           r"graph there \(.*item\(\).*\) at test_errors.py:\d+\).*"
                                           r"capture_scalar_outputs = True"):
        torch.compile(net, backend="dropbp", options={"inner": "eager"})(x).sum().backward()
    report = dropbp_fx.explain(net, x)
    assert not report.gates
    assert any("blocks.0.fc1" in c and "capture_scalar_outputs" in c for c in report.cut), report
    assert "residual branches cut by a graph break" in str(report)
    # Dynamo's fix applied: one graph holds each branch, and both are gated
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        report = dropbp_fx.explain(net, x)
    # named like BERT's FFN: the add and the branch's layers are in one module
    assert [g.name for g in report.gates] == ["blocks.0.{fc1,fc2}", "blocks.1.{fc1,fc2}"] and not report.cut, report
    assert all(g.flops_share > 0.4 for g in report.gates), report  # fc1 and fc2 counted, the .item() too
    torch._dynamo.reset()


class CrossThenBreak(nn.Module):
    """A cross-attention block whose keys and values, projected from the encoder output outside the branch, go
    to the branch and out as the cache; then a graph break (SwitchTransformers' router after it)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, enc):
        k, v = self.k(enc), self.v(enc)
        x = x + self.o(torch.softmax(self.q(x) @ k.transpose(-2, -1), -1) @ v)
        torch._dynamo.graph_break()
        return x * 2, k, v


def test_keys_feeding_a_whole_branch_and_the_cache_are_no_cut_branch():
    """Regression (SwitchTransformers): ``k(enc)`` leaves the graph as the cache by a path that avoids every
    residual add, but its branch is whole and gated in this graph: no "ends inside a residual branch"."""
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = dropbp_fx.explain(CrossThenBreak(), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    assert [g.name for g in report.gates] == ["{q,o}"] and not report.cut, report
    assert not [w for w in caught if "ends inside" in str(w.message)]
    torch._dynamo.reset()


class VmapBlock(Block):
    """A branch that runs ``torch.func.vmap`` (Mamba's generic associative scan on CPU): Dynamo inlines it as
    stateful ``_vmap_increment_nesting`` ... ``_vmap_decrement_nesting`` calls, which must stay in one piece."""

    def forward(self, x):
        h = self.mlp[0](self.norm(x))
        h = torch.func.vmap(lambda row: torch.tanh(row) * row)(h)
        return x + self.mlp[2](h)


class NoGradBlock(Block):
    """A branch with a ``torch.no_grad()`` part (DeepSeek-V3.2's sparse-attention indexer picks tokens that way):
    Dynamo inlines it as ``_set_grad_enabled(False)`` ... ``_set_grad_enabled(True)``."""

    def forward(self, x):
        h = self.mlp[0](self.norm(x))
        with torch.no_grad():
            scale = torch.sigmoid(h).mean(-1, keepdim=True)
        return x + self.mlp[2](self.mlp[1](h)) * scale


@pytest.mark.parametrize("block", [VmapBlock, NoGradBlock])
@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_stateful_regions_inside_a_branch_are_gated_whole_with_oracle_gradients(block, inner):
    """Regions of paired calls (vmap levels, grad mode) come whole into the branch that uses them."""
    torch.manual_seed(0)
    net = Net(depth=2, block=block)
    reference = copy.deepcopy(net)
    x = torch.randn(4, 8)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)  # compiles: the gates exist after the first call
    assert dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"], dbp.gate_names  # named after its compute
    assert all(g.flops[0] > 0 and g.flops[1] > 0 for g in dbp.controller.gates)  # estimated from the weights
    for dropped in ({"blocks.0.mlp"}, {"blocks.1.mlp"}, set()):
        net.zero_grad(), reference.zero_grad()
        dbp.controller.set_rates({name: 1 - 1e-9 if name in dropped else 0.0 for name in dbp.gate_names})
        compiled(x).backward()
        with detached(reference, [f"{name}.2" for name in sorted(dropped)]):  # the branch's last layer
            reference(x).backward()
        assert_same_grads(grads(net), grads(reference))
    torch._dynamo.reset()


class SharedNoGradNet(Net):
    """A trunk part under ``torch.no_grad()`` read only by gates (HY-V4's sparse-attention indexer, whose top-k
    the next layer reuses): the weights ``pick`` chooses feed every block's branch."""

    def __init__(self):
        super().__init__(depth=2)
        self.pick = nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            w = torch.sigmoid(self.pick(x))
        for b in self.blocks:
            x = x + b.mlp(b.norm(x) * w)
        return self.head(x).pow(2).mean()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_stateful_region_in_the_trunk_stays_whole_in_its_segment(inner):
    """Split from its ``_set_grad_enabled`` calls into a gate-only segment, the region ran with grad on under an
    AOT-based inner compiler: ``pick`` got a gradient where eager gives none (inner eager: no trunk segments)."""
    torch.manual_seed(0)
    net = SharedNoGradNet()
    reference = copy.deepcopy(net)
    x = torch.randn(4, 8)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner=inner, policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    assert dbp.gate_names == ["blocks.0.mlp", "blocks.1.mlp"], dbp.gate_names
    for dropped in ({"blocks.0.mlp"}, {"blocks.0.mlp", "blocks.1.mlp"}, set()):
        net.zero_grad(set_to_none=True), reference.zero_grad(set_to_none=True)
        dbp.controller.set_rates({name: 1 - 1e-9 if name in dropped else 0.0 for name in dbp.gate_names})
        compiled(x).backward()
        with detached(reference, sorted(dropped)):
            reference(x).backward()
        assert net.pick.weight.grad is None
        assert_same_grads(grads(net), grads(reference))
    torch._dynamo.reset()
