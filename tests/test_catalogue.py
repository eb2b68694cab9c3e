"""The model catalogue (``python -m benchmarks.catalogue``) in CI: the generic shrink rule, the oracle's
gate -> module mapping, the report, and the per-model check on a fixed set of types (llama, mixtral, bloom)
plus 2 types that rotate with the date, under the aot_eager inner compiler (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

from benchmarks import catalogue  # noqa: E402
from benchmarks.catalogue_check import check, model_types, oracle_target, record_calls  # noqa: E402
from dropbp_fx.shrink import HIDDEN, LAYERS, VOCAB, classify, shrink  # noqa: E402

INNER = "aot_eager"
FIXED = ("llama", "mixtral", "bloom")
# type -> the reason recorded in benchmarks/results/catalogue.json, for fixed types that fail today
KNOWN_FAILING: dict[str, str] = {}
ROTATING = 2


# ----------------------------------------------------------------------------------------- the shrink rule
def test_shrink_llama():
    c = shrink(transformers.AutoConfig.for_model("llama"))
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (LAYERS, HIDDEN, 128)
    assert (c.num_attention_heads, c.head_dim, c.vocab_size) == (4, 16, VOCAB)
    assert c.num_attention_heads % c.num_key_value_heads == 0
    assert c.max_position_embeddings <= 128 and c.dtype == torch.float32


def test_shrink_keeps_grouped_query_attention_and_token_ids_below_vocab():
    c = shrink(transformers.AutoConfig.for_model("mistral"))  # 32 heads, 8 KV heads
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    g = shrink(transformers.AutoConfig.for_model("gpt2"))  # bos = eos = 50256
    assert (g.n_layer, g.n_embd, g.vocab_size) == (LAYERS, HIDDEN, VOCAB)
    assert g.bos_token_id < VOCAB and g.eos_token_id < VOCAB


def test_shrink_per_layer_lists_keep_both_kinds():
    c = shrink(transformers.AutoConfig.for_model("gemma3_text"))  # 5 sliding layers, then a full one, repeated
    assert len(c.layer_types) == LAYERS and set(c.layer_types) == {"sliding_attention", "full_attention"}
    m = shrink(transformers.AutoConfig.for_model("mixtral"))
    assert (m.num_local_experts, m.num_experts_per_tok) == (4, 2)


def test_shrink_nested_sub_configs():
    c = shrink(transformers.AutoConfig.for_model("gemma3"))
    assert (c.text_config.num_hidden_layers, c.text_config.hidden_size) == (LAYERS, HIDDEN)
    assert (c.vision_config.num_hidden_layers, c.vision_config.image_size) == (LAYERS, 32)
    assert c.vision_config.image_size % c.vision_config.patch_size == 0
    t = shrink(transformers.AutoConfig.for_model("t5"))
    assert (t.num_layers, t.num_decoder_layers, t.d_model, t.d_kv, t.dropout_rate) == (LAYERS, LAYERS, HIDDEN, 16, 0.0)


def test_classify_names():
    assert [classify(n) for n in ("num_hidden_layers", "n_layer", "decoder_layers", "hidden_size", "d_model",
                                  "num_key_value_heads", "attention_dropout", "layer_norm_eps")] == \
        ["layers", "layers", "layers", "hidden", "hidden", "kv_heads", "zero", None]


# ----------------------------------------------------------------------------------------- the oracle's mapping
class Block(nn.Module):
    """x + post_norm(attn(x)), then x + fc2(act(fc1(x))) through a dropout shared by both branches."""

    def __init__(self):
        super().__init__()
        self.attn, self.post_norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        x = x + self.drop(self.post_norm(self.attn(x)))
        return x + self.drop(self.fc2(self.act(self.fc1(x))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return self.block(x)


def test_oracle_target_follows_post_norms_and_unions():
    net = Net()
    calls = record_calls(net, {"x": torch.randn(2, 8)})
    modules = {n for n, _ in net.named_modules()}
    params = {n for n, m in net.named_modules() if any(True for _ in m.parameters())}
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}
    # the post-norm belongs to the branch; the shared dropout (twice per forward, no parameters) ends the chain
    assert oracle_target("block.attn", calls, modules, params, leaves) == ("block.post_norm", "")
    assert oracle_target("block.{fc1,fc2}", calls, modules, params, leaves) == ("block.fc2", "")
    assert oracle_target("block.{b,c}", calls, modules, params, leaves)[0] is None  # not module paths
    # runs twice: each gate is one call (``#1`` the second)
    assert oracle_target("block.drop", calls, modules, params, leaves) == (("block.drop", 0), "")
    assert oracle_target("block.drop#1", calls, modules, params, leaves) == (("block.drop", 1), "")


def _recorded(net_cls):
    """A seeded double-precision ``net_cls()``, an input, and what ``oracle_target`` reads of one eager forward."""
    torch.manual_seed(0)
    net = net_cls().double()
    x = torch.randn(2, 3, 8, dtype=torch.double)
    calls = record_calls(net, {"x": x})
    modules = {n for n, _ in net.named_modules()}
    params = {n for n, m in net.named_modules() if any(True for _ in m.parameters())}
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}
    return net, x, (calls, modules, params, leaves)


class _SharedLayer(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.ffn, self.ffn_output = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h):
        h = h + self.attn(h)
        return h + self.ffn_output(torch.relu(self.ffn(h)))


class SharedLayerNet(nn.Module):
    """ALBERT's shape: one layer module run twice per forward, each call its own two gates (``...#1``)."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.layer, self.out = nn.Linear(d, d), _SharedLayer(d), nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(2):
            h = self.layer(h)
        return self.out(h).sum()


class _AggregationBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2)])
        self.aggregation = nn.Linear(3 * d, d)

    def forward(self, h):
        outputs, y = [h], h
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        return h + self.aggregation(torch.cat(outputs, dim=-1))


class AggregationNet(nn.Module):
    """HGNetV2's block: ``h + aggregation(cat([h, layers[0](h), layers[1](layers[0](h))]))``, a ``ModuleList``
    (never called itself) and a module in one branch, so its gate is ``block.{layers,aggregation}``."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(d, d), _AggregationBlock(d), nn.Linear(d, 1)

    def forward(self, x):
        return self.out(self.block(self.inp(x))).sum()


def test_oracle_maps_a_union_with_a_module_list_member():
    """A member that is a ``ModuleList`` stands for its called children: the gate maps (it reported "runs 0
    times per forward" before) and closing it gives the backend's gradients."""
    from dropbp_fx.testing import assert_same_grads, detached, grads

    import dropbp_fx

    net, x, (calls, modules, params, leaves) = _recorded(AggregationNet)
    oracle = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    assert dbp.gate_names == ["block.{layers,aggregation}"]
    target, why = oracle_target("block.{layers,aggregation}", calls, modules, params, leaves)
    assert target == "block.aggregation", why
    dbp.set_rates({"block.{layers,aggregation}": 1 - 1e-12})
    net.zero_grad(set_to_none=True)
    compiled(x).backward()
    assert dbp.last_mask == {"block.{layers,aggregation}": True}
    with detached(oracle, [target]):
        oracle(x).backward()
    assert net.block.layers[0][0].weight.grad is None and net.inp.weight.grad is not None
    assert_same_grads(grads(net), grads(oracle), rtol=1e-9, atol=1e-12)


def test_oracle_maps_each_call_of_a_shared_layer_to_that_call():
    """``name#k`` is the k-th call; the oracle detaches that call only, and its gradients are the backend's."""
    from dropbp_fx.testing import assert_same_grads, detached, grads

    import dropbp_fx

    net, x, (calls, modules, params, leaves) = _recorded(SharedLayerNet)
    assert oracle_target("layer.attn", calls, modules, params, leaves) == (("layer.attn", 0), "")
    assert oracle_target("layer.attn#1", calls, modules, params, leaves) == (("layer.attn", 1), "")
    assert oracle_target("layer.{ffn,ffn_output}#1", calls, modules, params, leaves) == (("layer.ffn_output", 1), "")
    assert oracle_target("layer.attn#2", calls, modules, params, leaves)[0] is None  # runs twice, not three times

    oracle = copy.deepcopy(net)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend=dbp)
    compiled(x)
    assert dbp.gate_names == ["layer.attn", "layer.{ffn,ffn_output}", "layer.attn#1", "layer.{ffn,ffn_output}#1"]
    for closed in (["layer.attn#1"], ["layer.{ffn,ffn_output}"], ["layer.attn", "layer.{ffn,ffn_output}#1"]):
        dbp.set_rates({g: (1 - 1e-12 if g in closed else 0.0) for g in dbp.gate_names})
        net.zero_grad(set_to_none=True), oracle.zero_grad(set_to_none=True)
        compiled(x).backward()
        assert {g for g, d in dbp.last_mask.items() if d} == set(closed)
        targets = [oracle_target(g, calls, modules, params, leaves)[0] for g in closed]
        with detached(oracle, targets):
            oracle(x).backward()
        assert_same_grads(grads(net), grads(oracle), rtol=1e-9, atol=1e-12)
        with detached(oracle, [t[0] for t in targets]):  # per module instead of per call: both calls detached
            oracle.zero_grad(set_to_none=True)
            oracle(x).backward()
        assert any(not torch.equal(a, b) for a, b in zip(grads(net).values(), grads(oracle).values())
                   if a is not None and b is not None)
    torch._dynamo.reset()


class _TwoStreams(nn.Module):
    """PEGASUS-X's shape: one attention call returns the local and the global tokens, each added to its stream."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, h, g):
        both = torch.cat([h, g], dim=1)
        mixed = self.o(torch.tanh(self.q(both)))
        return mixed[:, :h.shape[1]], mixed[:, h.shape[1]:]


class TwoStreamNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp, self.glob, self.attn, self.out = nn.Linear(d, d), nn.Linear(d, d), _TwoStreams(d), nn.Linear(d, 1)

    def forward(self, x, detach=()):
        h, g = self.inp(x), self.glob(x)
        local, global_ = self.attn(h, g)
        local, global_ = (local.detach() if 0 in detach else local), (global_.detach() if 1 in detach else global_)
        h, g = h + local, g + global_
        return self.out(h).sum() + self.out(g).sum()


def test_oracle_maps_two_gates_of_one_call_to_its_two_outputs():
    """A gate per tensor output of one call (``name``, ``name#1``): ``(path, 0, j)``, and the hook oracle
    detaches that output alone (the reference detaches it by hand)."""
    from dropbp_fx.testing import detached, grads

    net, x, (calls, modules, params, leaves) = _recorded(TwoStreamNet)
    names = ["attn", "attn#1"]
    assert oracle_target("attn", calls, modules, params, leaves, names) == (("attn", 0, 0), "")
    assert oracle_target("attn#1", calls, modules, params, leaves, names) == (("attn", 0, 1), "")
    for j in (0, 1):
        net.zero_grad(set_to_none=True)
        with detached(net, [("attn", 0, j)]):
            net(x).backward()
        got = grads(net)
        net.zero_grad(set_to_none=True)
        net(x, detach=(j,)).backward()
        want = grads(net)
        assert all(torch.equal(got[n], want[n]) for n in want)
        net.zero_grad(set_to_none=True)
        net(x).backward()
        assert not torch.equal(grads(net)["attn.q.weight"], want["attn.q.weight"])  # the detach mattered


class _ResidualScaling(nn.Module):
    """Zaya's residual add: ``(h + b) * s + (r + rb) * rs``, one module taking the branch value and the skip."""

    def __init__(self, d=8):
        super().__init__()
        self.b, self.s, self.rb, self.rs = (nn.Parameter(torch.randn(d)) for _ in range(4))

    def forward(self, h, r):
        return (h + self.b) * self.s + (r + self.rb) * self.rs


class ScaledNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(4, d))
        self.inp, self.scale, self.out = nn.Linear(d, d), _ResidualScaling(d), nn.Linear(d, 1)
        self.attn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.mlp = nn.Linear(d, d)

    def forward(self, x, latents=False):
        if latents:  # a stream that starts as a parameter: its add to the branch is no bias
            r = self.latents.expand(x.shape[0], -1, -1)
            return self.out(r + self.mlp(r))
        h = self.inp(x)
        return self.out(self.scale(self.attn(h), h))


def test_oracle_detaches_a_bias_and_scale_applied_to_the_branch():
    """The bias and scale a module applies to the branch value before its add with the skip belong to the
    branch (dropbp gates them with it): the oracle runs them detached too, and dropbp agrees."""
    import dropbp_fx
    from dropbp_fx.testing import assert_same_grads, detached, grads

    torch.manual_seed(0)
    net = ScaledNet()
    oracle = copy.deepcopy(net)
    x = torch.randn(2, 4, 8)
    with detached(oracle, ["attn"], through_constants=True):
        oracle(x).sum().backward()
    assert oracle.scale.b.grad is None and oracle.scale.s.grad is None and oracle.attn[0].weight.grad is None
    assert oracle.scale.rb.grad is not None and oracle.inp.weight.grad is not None  # the skip side trains

    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli")
    compiled = torch.compile(net, backend=dbp)
    compiled(x).sum().backward()
    assert dbp.gate_names == ["attn"]
    dbp.set_rates({"attn": 0.999999})
    net.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert dbp.last_mask == {"attn": True}
    assert_same_grads(grads(net), grads(oracle))

    oracle.zero_grad(set_to_none=True)
    with detached(oracle, ["mlp"], through_constants=True):
        oracle(x, latents=True).sum().backward()
    assert oracle.mlp.weight.grad is None and oracle.latents.grad is not None and oracle.out.weight.grad is not None


class _Interpolating(nn.Module):
    """Dory / nGPT: ``h + a * (norm(f(h)) - h)``, ``a`` a per-channel rate of the layer, ``norm`` parameter-free."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 1)
        self.attn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.rate = nn.Parameter(torch.full((d,), 0.3))

    def forward(self, x):
        h = self.inp(x)
        f = F.normalize(self.attn(h), dim=-1)
        return self.out(h + self.rate.abs() * (f - h))


def test_oracle_closes_the_whole_interpolating_term():
    """The oracle closes ``a * (f(h) - h)`` for the interpolating residual (docs/residuals.md): no gradient to
    ``f`` or ``a``, the skip's gradient the identity; it equals the hand-detached form and dropbp agrees."""
    import dropbp_fx
    from dropbp_fx.testing import assert_same_grads, detached, grads

    torch.manual_seed(0)
    net = _Interpolating()
    oracle, by_hand = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(2, 4, 8)
    with detached(oracle, ["attn"], through_constants=True):
        oracle(x).sum().backward()
    assert oracle.rate.grad is None and oracle.attn[0].weight.grad is None and oracle.inp.weight.grad is not None
    h = by_hand.inp(x)
    term = by_hand.rate.abs() * (F.normalize(by_hand.attn(h), dim=-1) - h)
    by_hand.out(h + term.detach()).sum().backward()
    assert_same_grads(grads(oracle), grads(by_hand))

    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    compiled = torch.compile(net, backend=dbp)
    compiled(x).sum().backward()
    dbp.set_rates({g: 0.999999 for g in dbp.gate_names})
    net.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert dbp.last_mask == {"attn": True}
    assert_same_grads(grads(net), grads(oracle))


class _SharedExpert(nn.Module):
    """GraniteMoeHybrid's feed-forward: ``x + (moe(h) + shared(h)) * m``, two modules summed, then scaled."""

    def __init__(self, d=8):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(d, d), nn.LayerNorm(d), nn.Linear(d, 1)
        self.moe = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))
        self.shared = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = self.inp(x)
        h = self.norm(x)
        return self.out(x + (self.moe(h) + self.shared(h)) * 0.5)


def test_oracle_detaches_every_parallel_member_of_a_union():
    """A union gate of parallel terms (``{moe,shared}``: both read ``h``, neither reads the other) is their sum:
    the oracle detaches each member (it detached the last one only, so the first kept its gradient: WRONG
    GRADIENT for GraniteMoeHybrid), and dropbp agrees."""
    import dropbp_fx
    from dropbp_fx.testing import assert_same_grads, detached, grads

    torch.manual_seed(0)
    net = _SharedExpert()
    oracle = copy.deepcopy(net)
    x = torch.randn(2, 4, 8)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    compiled = torch.compile(net, backend=dbp)
    compiled(x).sum().backward()
    assert dbp.gate_names == ["{moe,shared}"]
    calls = record_calls(oracle, {"x": x})
    modules = {n for n, _ in oracle.named_modules()}
    with_params = {n for n, m in oracle.named_modules() if any(True for _ in m.parameters())}
    leaves = {n for n, m in oracle.named_modules() if not any(True for _ in m.children())}
    target, why = oracle_target("{moe,shared}", calls, modules, with_params, leaves)
    assert target == ["moe", "shared"], why
    dbp.set_rates({"{moe,shared}": 0.999999})
    net.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert dbp.last_mask == {"{moe,shared}": True}
    with detached(oracle, target, through_constants=True):
        oracle(x).sum().backward()
    assert oracle.moe[0].weight.grad is None and oracle.shared[0].weight.grad is None
    assert_same_grads(grads(net), grads(oracle))


class _FunctionalConv(nn.Module):
    """Inkling's short convolution: ``(x + conv(x)) / sqrt(k + 1)``, its own residual add, with the weight of
    ``self.conv1d`` passed to ``F.conv1d`` (as the kernel-hub ``causal_conv1d_fn`` does): ``conv1d`` never runs."""

    def __init__(self, d=8, k=4, drop=False):
        super().__init__()
        self.k, self.drop = k, drop
        self.conv1d = nn.Conv1d(d, d, k, groups=d, padding=k - 1, bias=False)

    def forward(self, x):
        w = self.conv1d.weight.squeeze(1)
        y = F.conv1d(x.transpose(1, 2), w.unsqueeze(1), padding=self.k - 1, groups=x.shape[-1])
        y = y[..., :x.shape[1]].transpose(1, 2)
        return (x + (y.detach() if self.drop else y)) / math.sqrt(self.k + 1)


class ConvNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp, self.sconv, self.out = nn.Linear(d, d), _FunctionalConv(d), nn.Linear(d, 1)

    def forward(self, x, as_output=False):  # the catalogue's oracle step reads ``.loss``
        loss = self.out(self.sconv(self.inp(x))).sum()
        return SimpleNamespace(loss=loss) if as_output else loss


def test_oracle_detaches_parametric_leaves_read_as_weights():
    """A gate named after a module with its own residual add and scale, ``(x + conv(x)) / s``, whose leaf is
    never called (its weight is read directly): the oracle's "leaves" variant detaches the ops reading that
    weight, the hand-written drop (``conv(x).detach()``) agrees, and so does dropbp with the gate closed."""
    import dropbp_fx
    from benchmarks.catalogue_check import _oracle_step
    from dropbp_fx.testing import assert_same_grads, grads

    torch.manual_seed(0)
    net = ConvNet()
    oracle, by_hand = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(2, 6, 8)
    _oracle_step(oracle, {"x": x, "as_output": True}, ["sconv"], {"sconv": "sconv"}, {"sconv": "leaves"})
    by_hand.sconv.drop = True
    by_hand(x).backward()
    assert oracle.sconv.conv1d.weight.grad is None and oracle.inp.weight.grad is not None
    assert_same_grads(grads(oracle), grads(by_hand))

    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli")
    compiled = torch.compile(net, backend=dbp)
    compiled(x).backward()
    assert dbp.gate_names == ["sconv"]
    dbp.set_rates({"sconv": 0.999999})
    net.zero_grad(set_to_none=True)
    compiled(x).backward()
    assert dbp.last_mask == {"sconv": True}


class _OwnPostNormAttention(nn.Module):
    """XLNet's attention: weights held on the module itself (no Linear child), then
    ``layer_norm(dropout(attn) + h)`` -- the residual add and the post-norm inside the module."""

    def __init__(self, d=8):
        super().__init__()
        self.q, self.o = nn.Parameter(torch.randn(d, d) / d ** 0.5), nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.layer_norm, self.dropout = nn.LayerNorm(d), nn.Dropout(0.0)

    def forward(self, h):
        attn = torch.softmax(h @ self.q @ h.transpose(-1, -2), -1) @ h @ self.o
        return self.layer_norm(self.dropout(attn) + h), None


class _OwnPostNormFeedForward(nn.Module):
    """XLNet's feed-forward: ``layer_norm(layer_2(act(layer_1(x))) + x)``; its input is read by ``layer_1``
    and by its own add."""

    def __init__(self, d=8):
        super().__init__()
        self.layer_1, self.act, self.layer_2, self.layer_norm = nn.Linear(d, 16), nn.GELU(), nn.Linear(16, d), \
            nn.LayerNorm(d)

    def forward(self, x):
        return self.layer_norm(self.layer_2(self.act(self.layer_1(x))) + x)


class OwnPostNormNet(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 1)
        self.attn, self.ff = _OwnPostNormAttention(d), _OwnPostNormFeedForward(d)

    def forward(self, x):
        h, _ = self.attn(self.inp(x))
        return self.out(self.ff(h))


def test_oracle_keeps_the_skip_and_post_norm_of_a_module_with_its_own_residual_add():
    """A gate named after a module that returns ``norm(dropout(f(h)) + h)`` (XLNet's rel_attn): the branch
    ends at the add inside the module, the skip h and the post-norm keep their gradient. The oracle finds the
    add from the recorded ops (its chain does not run on into the next module's layer_1: that module's own
    add reads the value too) and agrees with dropbp."""
    import dropbp_fx
    from benchmarks.catalogue_check import OwnResidual, own_residual_detached
    from dropbp_fx.testing import assert_same_grads, grads

    torch.manual_seed(0)
    net = OwnPostNormNet()
    oracle = copy.deepcopy(net)
    x = torch.randn(2, 4, 8)
    calls = record_calls(net, {"x": x})
    modules = {n for n, _ in net.named_modules()}
    params = {n for n, m in net.named_modules() if any(True for _ in m.parameters())}
    leaves = {n for n, m in net.named_modules() if not any(True for _ in m.children())}
    target = OwnResidual("attn", "attn.layer_norm", 0)
    assert oracle_target("attn", calls, modules, params, leaves) == (target, "")
    assert oracle_target("ff.{layer_1,layer_2}", calls, modules, params, leaves) == ("ff.layer_2", "")

    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli")
    compiled = torch.compile(net, backend=dbp)
    compiled(x).sum().backward()
    assert "attn" in dbp.gate_names
    dbp.set_rates({g: 0.999999 if g == "attn" else 1e-6 for g in dbp.gate_names})
    net.zero_grad(set_to_none=True)
    compiled(x).sum().backward()
    assert [g for g, d in dbp.last_mask.items() if d] == ["attn"]

    with own_residual_detached(oracle, [target]):
        oracle(x).sum().backward()
    assert oracle.attn.q.grad is None and oracle.attn.o.grad is None
    assert oracle.attn.layer_norm.weight.grad is not None and oracle.inp.weight.grad is not None
    assert_same_grads(grads(net), grads(oracle))


# ----------------------------------------------------------------------------------------- the report
def test_numeric_wrong_gradient_is_checked_again_in_float64(monkeypatch):
    """A WRONG GRADIENT whose values are apart is re-checked with the model in float64: "pass in float64" only
    where that run passes; a gradient set where the oracle has none is never re-checked (no rounding does that)."""
    import benchmarks.catalogue_check as cc

    def fake_train(reason_fp32, fp64_passes):
        def train(model, oracle, batches, inner, rec, seed):
            wide = next(model.parameters()).dtype == torch.float64
            assert batches(0)["input_ids"].dtype == torch.long  # ids stay integers
            if wide and fp64_passes:
                rec.status, rec.reason, rec.checked_steps = "pass", "", 4
            else:
                rec.status, rec.reason = "WRONG GRADIENT", reason_fp32
        return train

    numeric = "step 0, dropped ['a']: w: Tensor-likes are not close!"
    for reason, fp64_passes, expected in [(numeric, True, "pass in float64"), (numeric, False, "WRONG GRADIENT"),
                                          ("step 0, dropped ['a']: w: grad is set, oracle None", True,
                                           "WRONG GRADIENT")]:
        monkeypatch.setattr(cc, "_train", fake_train(reason, fp64_passes))
        rec = cc.check("llama", "causal-lm", INNER, run_baseline=False)
        assert rec.status == expected, (reason, fp64_passes, rec.status)
        assert reason in rec.reason


def test_render_counts_and_groups():
    rec = dict(mapping="causal-lm", inner=INNER, gates=4, gates_per_layer=2.0, drop_fraction=0.5, seconds=3.0,
               reason="")
    data = {"meta": {"date": "d", "torch": "t", "transformers": "x", "command": "c"}, "multi": {}, "results": {
        "causal-lm/a": {**rec, "type": "a", "status": "pass"},
        "causal-lm/b": {**rec, "type": "b", "status": "WRONG GRADIENT", "reason": "step 1, dropped ['x']: w: bad 3"},
        "causal-lm/c": {**rec, "type": "c", "status": "WRONG GRADIENT", "reason": "step 0, dropped ['y']: w: bad 7"},
        "causal-lm/d": {**rec, "type": "d", "status": "unbuildable", "reason": "ValueError: no"}}}
    text = catalogue.render(data)
    assert "**1 of 3 buildable causal-lm types pass**" in text
    assert "| WRONG GRADIENT | w: bad N | b, c |" in text


def test_render_compile_time_column_flags_slow_types():
    rec = dict(mapping="causal-lm", inner=INNER, gates=4, gates_per_layer=2.0, drop_fraction=0.5, seconds=3.0,
               reason="", status="pass")
    data = {"meta": {}, "multi": {}, "results": {
        "causal-lm/fast": {**rec, "type": "fast", "compile_s": 5.0, "plain_compile_s": 2.5, "pieces": 6},
        "causal-lm/slow": {**rec, "type": "slow", "compile_s": 40.0, "plain_compile_s": 4.0, "pieces": 31},
        "causal-lm/old": {**rec, "type": "old"}}}
    text = catalogue.render(data)
    assert "for 2 of 3 types" in text and "Above 3x: 1 types" in text
    assert "| causal-lm | slow | 40.0 / 4.0 (**10.0x**) | 31 pieces compiled" in text
    assert "| fast | pass | 4 | 2.0 | 0.5 | 3 | 5.0 / 2.5 (2.0x) |" in text
    from benchmarks.catalogue_check import compile_seconds
    assert compile_seconds([9.0, 2.0, 0.5, 0.1], [3.0, 0.1, 0.1, 0.1]) == (11.2, 2.9)


# ----------------------------------------------------------------------------------------- the per-model check
def _rotating() -> list[str]:
    """2 causal-LM types, rotating with the day of the year: from those the last sweep built in under 60 s
    (not baseline-fails: plain torch.compile cannot train those either, for example deepseek_v4)."""
    path = catalogue.JSON_PATH
    pool = [t for t in model_types("causal-lm") if t not in FIXED]
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)["results"]
        recorded = [r["type"] for k, r in sorted(results.items()) if k.startswith("causal-lm/") and r["type"] in pool
                    and r["status"] not in ("unbuildable", "timeout", "crash", "baseline-fails") and r["seconds"] < 60]
        pool = recorded or pool
    day = datetime.date.today().timetuple().tm_yday
    return [pool[(day * ROTATING + i) % len(pool)] for i in range(ROTATING)]


@pytest.mark.parametrize("model_type", FIXED)
def test_fixed_types(model_type):
    if model_type in KNOWN_FAILING:
        pytest.xfail(KNOWN_FAILING[model_type])
    rec = check(model_type, "causal-lm", INNER, run_baseline=False)
    assert rec.status == "pass", f"{rec.status}: {rec.reason}"
    assert rec.gates == 2 * rec.layers and rec.checked_steps == 4


@pytest.mark.parametrize("index", range(ROTATING))
def test_rotating_types(index):
    model_type = _rotating()[index]
    rec = check(model_type, "causal-lm", INNER, run_baseline=False)
    assert rec.status not in ("WRONG GRADIENT", "wrong forward"), f"{model_type}: {rec.status}: {rec.reason}"


def test_pegasus_x_global_tokens_get_no_gradient_when_their_gates_close():
    """PEGASUS-X's ``embed_global`` is read only by the encoder's attention branches (its global stream after
    the last layer is dropped): on a step that closes them, the eager oracle leaves its ``.grad`` as ``None``,
    while the compiled trunk segment hands it zeros. ``dropbp_fx.branch_only`` puts ``None`` back (this check
    failed with WRONG GRADIENT, ``embed_global.weight: grad is set, oracle None``, before it)."""
    rec = check("pegasus_x", "seq2seq-lm", INNER, run_baseline=False)
    assert rec.status == "pass", f"{rec.status}: {rec.reason}"
    assert rec.checked_steps == 4


@pytest.mark.parametrize("closed", [("model.layers.1",), ("model.layers.0", "model.layers.1.mlp")])
def test_gemma3n_altup_prediction_gate_closes_the_prediction_branch(closed, monkeypatch):
    """Gemma3n's AltUp predicts the next streams as ``coefs(router(h)) @ h + h`` in ``altup.predict``, a method
    the layer's forward calls: a residual add whose branch dropbp gates under the layer's name. The catalogue's
    hook oracle cannot detach a method's value (it reports "oracle cannot map gate"), so this oracle does it by
    hand: ``predict`` returns ``h + (prediction - h).detach()`` for the closed layers, and the gradients agree."""
    import transformers.models.gemma3n.modeling_gemma3n as gemma3n

    import dropbp_fx
    from benchmarks.catalogue_check import batch_fn, build, detached, loss_of
    from dropbp_fx.testing import assert_same_grads, grads

    torch.manual_seed(0)
    model, _ = build("gemma3n_text", "causal-lm")
    oracle = copy.deepcopy(model)
    batch = batch_fn(model, "causal-lm")(0)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager", policy="bernoulli", keep_one_open=False)
    compiled = torch.compile(model, backend=dbp)
    loss_of(compiled(**batch)).backward()
    assert {"model.layers.0", "model.layers.1", "model.layers.1.mlp"} <= set(dbp.gate_names)
    dbp.set_rates({g: (1 - 1e-12 if g in closed else 0.0) for g in dbp.gate_names})
    model.zero_grad(set_to_none=True)
    loss_of(compiled(**batch)).backward()
    assert sorted(g for g, d in dbp.last_mask.items() if d) == sorted(closed)

    predict = gemma3n.Gemma3nTextAltUp.predict
    closed_altups = {id(oracle.get_submodule(g).altup) for g in closed if g.count(".") == 2}

    def predict_closed(self, hidden_states):
        out = predict(self, hidden_states)
        return hidden_states + (out - hidden_states).detach() if id(self) in closed_altups else out

    monkeypatch.setattr(gemma3n.Gemma3nTextAltUp, "predict", predict_closed)
    with detached(oracle, [g for g in closed if g.count(".") > 2], through_constants=True):
        loss_of(oracle(**batch)).backward()
    assert oracle.model.layers[1].altup.prediction_coefs.weight.grad is None or "model.layers.1" not in closed
    assert_same_grads(grads(model), grads(oracle), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_oracle_refuses_a_gate_named_after_a_module_that_holds_other_gates():
    from benchmarks.catalogue_check import Call

    modules = {"layers.0", "layers.0.mlp"}
    calls = [Call("layers.0", 1, 4), Call("layers.0.mlp", 2, 3)]
    target, why = oracle_target("layers.0", calls, modules, modules, {"layers.0.mlp"},
                                ["layers.0", "layers.0.mlp"])
    assert target is None and "holds other gates ('layers.0.mlp'" in why
    # a ModuleList is never called: it has no frame of its own, so that is not why it would not map (HRM)
    target, why = oracle_target("layers.0", calls[1:], modules, modules, {"layers.0.mlp"},
                                ["layers.0", "layers.0.mlp"])
    assert "holds other gates" not in why
