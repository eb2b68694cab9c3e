"""Random residual networks with known residual branches, for the property tests.

A hypothesis strategy draws a :class:`NetSpec`; :func:`build` turns it into an
``nn.Module`` plus its ground truth (:class:`Truth`): the names the residual
analysis must report (gated innermost branches and nested outer branches), the kind of
each, and for each gated branch the module whose output *is* the branch value (what
the oracle detaches when the gate is closed).

Nothing here imports ``dropbp_fx`` or ``passes``: the truth follows from how the
network is put together, using the naming rule of the analysis:

* a branch is named after the common module path of its compute nodes (linear,
  matmul, conv, attention); a branch module holding a single ``Linear`` is named after
  that ``Linear``;
* when the module of that common path also holds the residual add (a block whose
  branch layers are its direct children, BERT-style), the name lists the children:
  ``blocks.1.{b0_fc1,b0_fc2}``;
* the second call of a shared block gives the same paths again: ``name#1``.

Shapes of branches: pre-norm ``x + f(norm(x))``, post-norm ``norm(x + f(x))``,
sandwich ``x + norm(f(norm(x)))``, parallel ``x + f(ln(x)) + g(ln(x))`` (three
associations), projection ``f(x) + proj(x)``, nesting (``f`` holds ``h + g(h)``), hyper-connections
(``post(H) * f(pre(H) . H) + comb(H)^T @ H``, :class:`HyperBlock`), every add
spelling (``+``, ``+=``, ``torch.add(alpha=)``, ``Tensor.add``, a skip through a view / copy /
cast), attention branches that also return their k and v (side outputs). Decoy adds that must not be detected: RoPE, ``var + eps``, bias
adds, position embeddings, ``arange + offset``, attention mask / position-bias adds,
tied-weight sums and a parameter-free ``x + relu(x) * 0.5``.

Opaque kernels (body ``kernel``): the branch's layers run through a hand-written ``autograd.Function``
(with and without ``once_differentiable``), a ``torch.library`` custom op with a registered autograd
formula, or a frozen quantized-style weight (``uint8`` storage and a scale, dequantized inside an
``autograd.Function``, as bitsandbytes' 4-bit matmul does): the analysis must see them as parametric
compute from data flow alone.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

T = 4  # sequence length
BATCH = 2

# Add spellings. ``iadd_out``: ``y = f(x); y += x`` (the fresh tensor is the branch output);
# ``iadd_clone``: ``y = x.clone(); y += f(x)``; ``alpha``: ``torch.add(a, b, alpha=0.5)``;
# ``alias_*``: the skip goes through a view / copy / cast of itself first (``x.view(x.shape) + f(x)``).
# ``cast_to_out``: ``x.to(f(x).dtype) + f(x)`` (a dtype query of the branch output);
# ``method_inplace``: ``y = x.clone(); y.add_(f(x))``.
ADDS = ("plus", "torch_add", "alpha", "method", "iadd_out", "iadd_clone", "alias_view", "alias_contiguous",
        "alias_to", "cast_to_out", "method_inplace")
SUM_ADDS = ("plus", "torch_add", "alpha", "method", "iadd_out")  # for ``f + g`` (no skip operand)


def residual_add(spelling: str, skip: torch.Tensor, out: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """``skip + out`` in the chosen spelling (``skip_first`` picks the operand order where it is free)."""
    if spelling == "iadd_out":
        y = out
        y += skip
        return y
    if spelling == "iadd_clone":
        y = skip.clone()
        y += out
        return y
    if spelling == "method_inplace":
        y = skip.clone()
        y.add_(out)
        return y
    if spelling.startswith("alias_") or spelling == "cast_to_out":
        skip = {"alias_view": lambda: skip.view(skip.shape), "alias_contiguous": lambda: skip.contiguous(),
                "alias_to": lambda: skip.to(skip.dtype), "cast_to_out": lambda: skip.to(out.dtype)}[spelling]()
        spelling = "plus"
    a, b = (skip, out) if skip_first else (out, skip)
    return plain_add(spelling, a, b)


def plain_add(spelling: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if spelling == "plus":
        return a + b
    if spelling == "torch_add":
        return torch.add(a, b)
    if spelling == "alpha":
        return torch.add(a, b, alpha=0.5)
    if spelling == "method":
        return a.add(b)
    if spelling == "iadd_out":  # ``a`` must be a fresh tensor
        a += b
        return a
    raise ValueError(spelling)


# ---------------------------------------------------------------------------
# specs
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BranchSpec:
    """One residual branch. ``body``: single | mlp | func | attn | nested | kernel."""

    body: str = "mlp"
    kernel: str = "fn"  # kernel body: fn | fn_once | op | quant (see ``KERNELS``)
    hidden: int = 8
    norm: str = "ln"  # ln | rms (a functional RMSNorm: ``var + eps`` decoy)
    style: str = "pre"  # pre | post | sandwich
    norm_in_block: bool = False  # pre-norm: the norm is a module of the block, not of the branch module
    flat: bool = False  # the branch's layers are children of the block (BERT-style); single/mlp only
    add: str = "plus"
    skip_first: bool = True
    layer_scale: bool = False  # ``gamma * f(x)`` with a parameter gamma (branch module only)
    bias_as: bool = False  # ``f(x) + b.expand_as(x)``: a bias shaped by the stream (GPT-NeoX-Japanese; branch module)
    relu_half: bool = False  # decoy ``h + relu(h) * 0.5`` inside an mlp
    unread: bool = False  # mlp: ``tanh(h) * h`` computed and never read (RWKV's state update after the last token)
    shape_tensor: bool = False  # mlp: ``h.view(..., torch.div(n, 2), 2)``: a size given as a 0-d tensor (Longformer)
    rope: bool = False  # attn: ``q * cos + rot(q) * sin`` with cos/sin buffers
    mask: str = "none"  # attn: none | input | buffer | bias (an nn.Parameter position bias) | fill (XLM's
    #   ``scores.masked_fill_(m.expand_as(scores), v)``: a value shaped by the branch and read by it) | ids
    #   (``where(ids != 0, 0, -1e4)``, ``ids`` integers computed from the stream: linked to it, no gradient)
    sdpa: bool = False  # attn: F.scaled_dot_product_attention instead of matmul/softmax/matmul
    cache: bool = False  # attn: also return (k, v), which the network returns (a KV cache: side outputs)
    kv_build: bool = False  # attn: k split in two and written into slices of ``k.new_empty`` (DeepSeek's MLA)
    inner: "BranchSpec | None" = None  # nested: the inner residual branch
    inner_post: bool = False  # nested: ``norm(h + g(h))`` instead of ``h + g(h)``
    light: bool = False  # nested: no compute of its own around the inner residual (its inner level is gated)


@dataclass(frozen=True)
class BlockSpec:
    kind: str = "seq"  # seq | parallel | projection
    branches: tuple[BranchSpec, ...] = (BranchSpec(),)
    assoc: str = "left"  # parallel: left (x+f)+g | right x+(f+g) | sum_first (f+g)+x
    shared_ln: bool = True  # parallel: one ln for both terms
    sum_add: str = "plus"  # parallel right/sum_first: spelling of f + g
    d_out: int = 8  # projection
    post_norm: bool = False  # projection: ``norm(f(x) + proj(x))``
    after: str = "none"  # none | relu_half: a decoy add between this block and the next
    hyper_skip: str = "comb"  # hyper: comb (DeepSeek-V4: comb^T @ H) | identity (Qwen4-exp: H + (f ⊗ post).flatten)


@dataclass(frozen=True)
class NetSpec:
    blocks: tuple[BlockSpec, ...] = (BlockSpec(),)
    d_in: int = 8
    width: int = 8
    stem: str = "none"  # none | linear | pos | arange_pos | tied
    repeat_last: bool = False  # call the last block a second time (shared weights: ``name#1``)
    head: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Gate:
    name: str  # expected gate name
    detach: str  # module whose output is the branch value
    call: int  # which call of that module (0, or 1 for the repeated block)
    kind: str


@dataclass
class Truth:
    """What the residual analysis must find: ``gates`` are the innermost branches, ``outer`` the branches that
    hold others; ``nests`` pairs each outer branch (as a gate) with the truth inside it, for :func:`resolve`."""

    gates: list[Gate] = field(default_factory=list)
    outer: list[tuple[str, str]] = field(default_factory=list)  # (name, kind)
    nests: list[tuple[Gate, "Truth"]] = field(default_factory=list)

    @property
    def gated_names(self) -> set[str]:
        return {g.name for g in self.gates}

    @property
    def outer_names(self) -> set[str]:
        return {n for n, _ in self.outer}

    def extend(self, other: "Truth") -> None:
        self.gates += other.gates
        self.outer += other.outer
        self.nests += other.nests

    def renamed(self, suffix: str, call: int) -> "Truth":
        """The same branches in another call of their modules (``name#1``)."""
        return Truth([replace(g, name=g.name + suffix, call=call) for g in self.gates],
                     [(n + suffix, k) for n, k in self.outer],
                     [(replace(o, name=o.name + suffix, call=call), t.renamed(suffix, call)) for o, t in self.nests])


OUTER_MARGIN = 1.25  # the backend's rule, stated again: a nest's outer level is gated at >= 1.25x the inner FLOPs


def resolve(truth: Truth, backward_flops: dict[str, int]) -> Truth:
    """The gates the backend must build: per nest, the outer branch where its backward FLOPs are at least
    ``OUTER_MARGIN`` times those of the best choice inside it, else that choice (bottom-up). ``backward_flops``
    are measured on the eager modules (:func:`module_backward_flops`), not by the code under test."""
    def chosen(t: Truth) -> list[Gate]:
        inside_nests = {g for _, inner in t.nests for g in inner.gates}
        gates = [g for g in t.gates if g not in inside_nests]
        for outer, inner in t.nests:
            best = chosen(inner)
            inner_flops = sum(backward_flops.get(g.detach, 0) for g in best)
            gates += [outer] if backward_flops.get(outer.detach, 0) >= OUTER_MARGIN * inner_flops else best
        return gates

    gates = chosen(truth)
    everything = {g.name: g for g in truth.gates} | {o.name: o for o, _ in _all_nests(truth)}
    kinds = {g.name: g.kind for g in everything.values()}
    return Truth(gates, [(n, kinds[n]) for n in everything if n not in {g.name for g in gates}])


def _all_nests(t: Truth):
    for outer, inner in t.nests:
        yield outer, inner
        yield from _all_nests(inner)


def module_backward_flops(net: nn.Module, inputs, paths) -> dict[str, int]:
    """Backward FLOPs each module at ``paths`` leaves droppable (all its calls): ``FlopCounterMode``'s total on the
    eager network for a forward and backward, less the same total with that module's outputs detached.

    Totals only: the counter's per-module attribution of backward FLOPs follows module hooks on the output
    tensors, which an in-place residual add (``y = f(x); y += x``) re-points, so a branch's backward is then
    credited to another module (seen: a nested branch 0, its first norm all of it).
    """
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net)

    def total(detach: str | None) -> int:
        handle = None if detach is None else net.get_submodule(detach).register_forward_hook(
            lambda mod, args, out: _detached(out))
        try:
            with FlopCounterMode(display=False) as forward:
                net(*inputs)
            with FlopCounterMode(display=False) as both:
                out = net(*inputs)
                out = [o for o in (out if isinstance(out, tuple) else (out,))
                       if isinstance(o, torch.Tensor) and o.requires_grad]
                if out:
                    sum(o.sum() for o in out).backward()
        finally:
            if handle is not None:
                handle.remove()
        return both.get_total_flops() - forward.get_total_flops()

    everything = total(None)
    return {path: everything - total(path) for path in paths}


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    return type(out)(_detached(o) for o in out) if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "rms":
        return RMSNorm(d)
    norm = nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn(d))
        norm.bias.add_(0.1 * torch.randn(d))
    return norm


def call_branch(branch: nn.Module, x, mask, cache: list):
    """``branch(x, mask)``; side outputs (``(k, v)`` of a caching attention) go to ``cache``."""
    out = branch(x, mask)
    if isinstance(out, tuple):
        out, side = out
        cache.extend(side)
    return out


def rotate_half(q):
    half = q.shape[-1] // 2
    return torch.cat([-q[..., half:], q[..., :half]], dim=-1)


# ---------------------------------------------------------------------------
# opaque kernels
# ---------------------------------------------------------------------------
def linear_grads(x, w, grad):
    """Gradients of ``x @ w.T + b`` for ``x``, ``w`` and ``b``."""
    rows = grad.reshape(-1, grad.shape[-1])
    return grad @ w, rows.T @ x.reshape(-1, x.shape[-1]), rows.sum(0)


class LinearFn(torch.autograd.Function):
    """``x @ w.T + b`` as a user's ``autograd.Function`` (Liger / Unsloth style)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return linear_grads(x, w, grad)


class LinearFnOnce(torch.autograd.Function):
    """The same with a ``once_differentiable`` backward (no double backward)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return x @ w.T + b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return linear_grads(x, w, grad)


@torch.library.custom_op("dropbp_tests::linear", mutates_args=())
def custom_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A ``torch.library`` custom op: opaque to Dynamo and to the FLOP counter (no formula registered)."""
    return x @ w.T + b


@custom_linear.register_fake
def _(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _custom_linear_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1])


def _custom_linear_backward(ctx, grad):
    x, w = ctx.saved_tensors
    return linear_grads(x, w, grad)


custom_linear.register_autograd(_custom_linear_backward, setup_context=_custom_linear_setup)


class DequantLinearFn(torch.autograd.Function):
    """``x @ dequant(Wq).T`` with a frozen ``uint8`` weight: gradient for ``x`` only (bitsandbytes' 4-bit path)."""

    @staticmethod
    def forward(ctx, x, wq, scale):
        w = (wq.to(x.dtype) - 128.0) * scale[:, None]
        ctx.save_for_backward(wq, scale)
        return x @ w.T

    @staticmethod
    def backward(ctx, grad):
        wq, scale = ctx.saved_tensors
        return grad @ ((wq.to(grad.dtype) - 128.0) * scale[:, None]), None, None


class KernelLinear(nn.Module):
    """One layer through an opaque kernel; ``quant``: a frozen ``uint8`` weight plus a trainable bias."""

    def __init__(self, kind: str, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kind = kind
        w = torch.randn(d_out, d_in) / math.sqrt(d_in)
        if kind == "quant":
            scale = w.abs().amax(1) / 127.0
            self.wq = nn.Parameter((w / scale[:, None]).round().add(128).to(torch.uint8), requires_grad=False)
            self.scale = nn.Parameter(scale, requires_grad=False)
        else:
            self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(0.1 * torch.randn(d_out))

    def forward(self, x):
        if self.kind == "quant":
            return DequantLinearFn.apply(x, self.wq, self.scale) + self.bias
        fn = {"fn": LinearFn.apply, "fn_once": LinearFnOnce.apply, "op": custom_linear}[self.kind]
        return fn(x, self.weight, self.bias)


KERNELS = ("fn", "fn_once", "op", "quant")


class Branch(nn.Module):
    """A residual branch as a module of its own: ``gamma * norm_out(body(norm_in(x)))``."""

    def __init__(self, spec: BranchSpec, d_in: int, d_out: int, *, norm_in: bool, norm_out: bool) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden
        if norm_in:
            self.norm_in = make_norm(spec.norm, d_in)
        body = spec.body
        if body == "single":
            self.fc = nn.Linear(d_in, d_out)
        elif body == "mlp":
            self.fc1 = nn.Linear(d_in, h)
            self.fc2 = nn.Linear(h, d_out)
        elif body == "func":
            self.w1 = nn.Parameter(torch.randn(h, d_in) / math.sqrt(d_in))
            self.b1 = nn.Parameter(0.1 * torch.randn(h))
            self.w2 = nn.Parameter(torch.randn(d_out, h) / math.sqrt(h))
            self.b2 = nn.Parameter(0.1 * torch.randn(d_out))
        elif body == "attn":
            assert d_in == d_out
            self.q, self.k, self.v, self.o = (nn.Linear(d_in, d_in) for _ in range(4))
            if spec.rope:
                pos = torch.arange(T, dtype=torch.float32)[:, None]
                freq = torch.arange(d_in, dtype=torch.float32)[None, :] / d_in
                self.register_buffer("cos", torch.cos(pos * freq))
                self.register_buffer("sin", torch.sin(pos * freq))
            if spec.mask == "buffer":
                self.register_buffer("mask_buf", torch.randn(T, T))
            elif spec.mask == "bias":
                self.pos_bias = nn.Parameter(torch.randn(T, T))
        elif body == "kernel":
            self.k1 = KernelLinear(spec.kernel, d_in, h)
            self.k2 = KernelLinear(spec.kernel, h, d_out)
        elif body == "nested":
            h = d_in if spec.light else h
            if not spec.light:
                self.fc_in = nn.Linear(d_in, h)
            self.inner = Branch(spec.inner, h, h, norm_in=True, norm_out=False)
            if spec.inner_post:
                self.inner_norm = make_norm(spec.norm, h)
            if not spec.light or d_out != h:
                self.fc_out = nn.Linear(h, d_out)
        else:
            raise ValueError(body)
        if norm_out:
            self.norm_out = make_norm(spec.norm, d_out)
        if spec.layer_scale:
            self.gamma = nn.Parameter(0.5 + 0.1 * torch.randn(d_out))
        if spec.bias_as:
            self.bias_as = nn.Parameter(0.1 * torch.randn(d_out))
            self.bias_of_stream = d_in == d_out  # a projection branch's bias takes the output's shape

    def forward(self, x, mask=None):
        spec = self.spec
        stream = x
        if hasattr(self, "norm_in"):
            x = self.norm_in(x)
        if spec.body == "single":
            y = self.fc(x)
        elif spec.body == "mlp":
            h = F.gelu(self.fc1(x))
            if spec.relu_half:
                h = h + torch.relu(h) * 0.5
            if spec.unread:
                torch.tanh(h) * h  # noqa: B018 - dead code, kept by Dynamo and symbolic_trace alike
            if spec.shape_tensor:  # a tensor made from numbers alone, computed in the trunk, read by the branch
                h = h.view(h.shape[0], h.shape[1], torch.div(h.shape[2], 2, rounding_mode="trunc"), 2).flatten(-2)
            y = self.fc2(h)
        elif spec.body == "func":
            h = torch.tanh(x @ self.w1.T + self.b1)
            y = h @ self.w2.T + self.b2
        elif spec.body == "kernel":
            y = self.k2(F.gelu(self.k1(x)))
        elif spec.body == "attn":
            y = self._attention(x, mask)
            if spec.cache:
                y, side = y
        else:  # nested
            h = self.fc_in(x) if hasattr(self, "fc_in") else x
            h = residual_add(spec.inner.add, h, self.inner(h, mask), spec.inner.skip_first)
            if spec.inner_post:
                h = self.inner_norm(h)
            y = self.fc_out(torch.relu(h)) if hasattr(self, "fc_out") else torch.relu(h)
        if hasattr(self, "norm_out"):
            y = self.norm_out(y)
        if spec.layer_scale:
            y = self.gamma * y
        if spec.bias_as:  # reads only the stream's shape: no data edge from the stream
            y = y + self.bias_as.expand_as(stream if self.bias_of_stream else y)
        return (y, side) if spec.body == "attn" and spec.cache else y

    def _attention(self, x, mask):
        """``o(attention)``, or ``(o(attention), (k, v))`` with ``spec.cache`` (see :func:`call_branch`)."""
        spec = self.spec
        q, k, v = self.q(x), self.k(x), self.v(x)
        if spec.kv_build:  # a tuple-valued split, then in-place writes into views of a fresh tensor
            half = k.shape[-1] // 2
            k_pass, k_rot = torch.split(k, [half, k.shape[-1] - half], dim=-1)
            k = k.new_empty(k.shape)
            k[..., :half].copy_(k_pass)
            k[..., half:].copy_(torch.tanh(k_rot))
        if spec.rope:
            q = q * self.cos + rotate_half(q) * self.sin
            k = k * self.cos + rotate_half(k) * self.sin
        bias = {"none": None, "input": mask, "buffer": getattr(self, "mask_buf", None),
                "bias": getattr(self, "pos_bias", None), "fill": None, "ids": None}[spec.mask]
        if spec.mask == "ids":  # T5Gemma: a padding mask made from integer "token ids" that also made the stream
            ids = (x[..., 0] > 0).long()
            bias = torch.where(ids[:, None, :] != 0, 0.0, -1e4).to(x.dtype)
        if spec.sdpa:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            if bias is not None:
                scores = scores + bias
            if spec.mask == "fill":  # XLM: a mask shaped by the scores, filled in place
                scores.masked_fill_((mask > 1).expand_as(scores), -1e4)  # the input mask: a graph input
            a = torch.softmax(scores, dim=-1) @ v
        if spec.cache and spec.kv_build:  # Mamba's state: the last key written into a fresh buffer, returned
            state = torch.zeros_like(k[:, -1])
            state.copy_(k[:, -1])
            return self.o(a), (state, v)
        return (self.o(a), (k, v)) if spec.cache else self.o(a)

    def truth(self, path: str, kind: str) -> Truth:
        """The gated (innermost) and outer branches of ``x + self(x)`` with this module at ``path``."""
        spec = self.spec
        if spec.body == "nested":
            inner = self.inner.truth(f"{path}.inner", "identity")
            return Truth(list(inner.gates), inner.outer + [(path, kind)], [(Gate(path, path, 0, kind), inner)])
        name = f"{path}.fc" if spec.body == "single" else path
        return Truth([Gate(name, path, 0, kind)])


class SeqBlock(nn.Module):
    """One or more branches applied in sequence: ``x = x + b0(x); x = x + b1(x)``."""

    def __init__(self, spec: BlockSpec, d: int) -> None:
        super().__init__()
        self.spec = spec
        for j, b in enumerate(spec.branches):
            pre = f"b{j}"
            in_block = b.style == "pre" and b.norm_in_block
            if b.flat:
                if b.style in ("pre", "sandwich"):
                    self.add_module(f"{pre}_norm", make_norm(b.norm, d))
                if b.body == "single":
                    self.add_module(f"{pre}_fc", nn.Linear(d, d))
                else:
                    self.add_module(f"{pre}_fc1", nn.Linear(d, b.hidden))
                    self.add_module(f"{pre}_fc2", nn.Linear(b.hidden, d))
                if b.style == "sandwich":
                    self.add_module(f"{pre}_norm_out", make_norm(b.norm, d))
            else:
                if in_block:
                    self.add_module(f"{pre}_norm", make_norm(b.norm, d))
                norm_in = b.style == "sandwich" or (b.style == "pre" and not in_block)
                self.add_module(pre, Branch(b, d, d, norm_in=norm_in, norm_out=b.style == "sandwich"))
            if b.style == "post":
                self.add_module(f"{pre}_post", make_norm(b.norm, d))

    def _flat(self, pre: str, b: BranchSpec, x):
        if hasattr(self, f"{pre}_norm"):
            x = getattr(self, f"{pre}_norm")(x)
        if b.body == "single":
            y = getattr(self, f"{pre}_fc")(x)
        else:
            y = getattr(self, f"{pre}_fc2")(F.gelu(getattr(self, f"{pre}_fc1")(x)))
        if hasattr(self, f"{pre}_norm_out"):
            y = getattr(self, f"{pre}_norm_out")(y)
        return y

    def forward(self, x, mask, cache):
        for j, b in enumerate(self.spec.branches):
            pre = f"b{j}"
            if b.flat:
                y = self._flat(pre, b, x)
            else:
                inp = getattr(self, f"{pre}_norm")(x) if hasattr(self, f"{pre}_norm") else x
                y = call_branch(getattr(self, pre), inp, mask, cache)
            x = residual_add(b.add, x, y, b.skip_first)
            if b.style == "post":
                x = getattr(self, f"{pre}_post")(x)
        return x

    def truth(self, path: str) -> Truth:
        t = Truth()
        for j, b in enumerate(self.spec.branches):
            pre = f"b{j}"
            if b.flat:
                if b.body == "single":
                    name = f"{path}.{pre}_fc"
                else:
                    name = f"{path}.{{{pre}_fc1,{pre}_fc2}}"
                last = f"{pre}_norm_out" if b.style == "sandwich" else (f"{pre}_fc" if b.body == "single"
                                                                          else f"{pre}_fc2")
                t.gates.append(Gate(name, f"{path}.{last}", 0, "identity"))
            else:
                t.extend(getattr(self, pre).truth(f"{path}.{pre}", "identity"))
        return t


class ParallelBlock(nn.Module):
    """``x + f(ln(x)) + g(ln(x))`` in one of three associations."""

    def __init__(self, spec: BlockSpec, d: int) -> None:
        super().__init__()
        self.spec = spec
        if spec.shared_ln:
            self.ln = make_norm(spec.branches[0].norm, d)
        self.f = Branch(spec.branches[0], d, d, norm_in=not spec.shared_ln, norm_out=False)
        self.g = Branch(spec.branches[1], d, d, norm_in=not spec.shared_ln, norm_out=False)

    def forward(self, x, mask, cache):
        spec = self.spec
        h = self.ln(x) if spec.shared_ln else x
        f_spec, g_spec = spec.branches
        if spec.assoc == "left":
            x = residual_add(f_spec.add, x, call_branch(self.f, h, mask, cache), f_spec.skip_first)
            return residual_add(g_spec.add, x, call_branch(self.g, h, mask, cache), g_spec.skip_first)
        s = plain_add(spec.sum_add, call_branch(self.f, h, mask, cache), call_branch(self.g, h, mask, cache))
        return residual_add(f_spec.add, x, s, spec.assoc == "right")

    def truth(self, path: str) -> Truth:
        kind = "identity" if self.spec.assoc == "left" else "parallel"
        t = self.f.truth(f"{path}.f", kind)
        t.extend(self.g.truth(f"{path}.g", kind))
        return t


class ProjectionBlock(nn.Module):
    """``f(x) + proj(x)``: ``f`` a >=2-layer branch, ``proj`` a single Linear (the skip)."""

    def __init__(self, spec: BlockSpec, d: int) -> None:
        super().__init__()
        self.spec = spec
        b = spec.branches[0]
        self.f = Branch(b, d, spec.d_out, norm_in=b.style == "pre", norm_out=False)
        self.proj = nn.Linear(d, spec.d_out)
        if spec.post_norm:
            self.norm = make_norm(b.norm, spec.d_out)

    def forward(self, x, mask, cache):
        b = self.spec.branches[0]
        y = residual_add(b.add, self.proj(x), self.f(x, mask), b.skip_first)
        return self.norm(y) if self.spec.post_norm else y

    def truth(self, path: str) -> Truth:
        return self.f.truth(f"{path}.f", "projection")


class HyperBlock(nn.Module):
    """A hyper-connection (DeepSeek-V4's mHC, reduced): the stream is spread over ``n`` copies ``H``, mixed
    weights ``pre, post, comb`` come from one projection of ``H``, and the block adds
    ``post * f(norm(pre . H)) + comb^T @ H`` before summing the copies again. The gate closes ``f`` and the
    ``pre`` mixing that feeds only ``f``; ``post`` and ``comb`` (computed beside ``f``, applied by the code
    that adds it) keep their gradient: what the oracle gets by detaching ``f``'s output.

    ``hyper_skip="identity"`` (Qwen4-exp's gated residual): the streams stay flat, ``(B, T, n * d)``, and the
    block adds ``H + (f.unsqueeze(-2) * post.unsqueeze(-1)).flatten(-2)``, no ``comb``: the product reaches the
    add through a view laying it out as the streams again."""

    N = 2

    def __init__(self, spec: BlockSpec, d: int) -> None:
        super().__init__()
        self.spec = spec
        n = self.N
        self.fn = nn.Parameter(torch.randn((2 + n) * n, n * d) / math.sqrt(n * d))
        self.base = nn.Parameter(torch.randn((2 + n) * n) * 0.1)
        self.f = Branch(spec.branches[0], d, d, norm_in=True, norm_out=False)

    def forward(self, x, mask, cache):
        n = self.N
        H = x.unsqueeze(2).expand(-1, -1, n, -1)
        flat = H.reshape(BATCH, T, -1)  # fixed sizes and slices: symbolic_trace cannot unpack a split
        w = F.linear(flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6), self.fn)
        pre = torch.sigmoid(w[..., :n] + self.base[:n])
        post = 2 * torch.sigmoid(w[..., n:2 * n] + self.base[n:2 * n])
        comb = torch.softmax(w[..., 2 * n:].view(BATCH, T, n, n) + self.base[2 * n:].view(n, n), dim=-1)
        if self.spec.hyper_skip == "identity":  # the flat streams are the stream: the mix reads them
            H = flat.view(BATCH, T, n, -1)
        out = self.f((pre.unsqueeze(-1) * H).sum(dim=2), mask)
        if self.spec.hyper_skip == "identity":
            flat = flat + (out.unsqueeze(-2) * post.unsqueeze(-1)).flatten(-2)
            return flat.view(BATCH, T, n, -1).sum(dim=2)
        H = post.unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.transpose(-1, -2), H)
        return H.sum(dim=2)

    def truth(self, path: str) -> Truth:
        return self.f.truth(f"{path}.f", "identity" if self.spec.hyper_skip == "identity" else "projection")


BLOCKS = {"seq": SeqBlock, "parallel": ParallelBlock, "projection": ProjectionBlock, "hyper": HyperBlock}


class Net(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.width
        if spec.stem in ("linear", "tied"):
            self.inp = nn.Linear(spec.d_in, d)
        elif spec.stem == "pos":
            self.pos_emb = nn.Parameter(torch.randn(T + 3, d))
        elif spec.stem == "arange_pos":
            self.offset = 2
            self.pos_table = nn.Parameter(torch.randn(T + 3, d))
        self.blocks = nn.ModuleList()
        for b in spec.blocks:
            self.blocks.append(BLOCKS[b.kind](b, d))
            if b.kind == "projection":
                d = b.d_out
        if spec.head:
            self.head_norm = make_norm("ln", d)
            self.head = nn.Linear(d, 3)

    def forward(self, x, ctx, mask):
        """The output, or ``(output, *kv_cache)`` when some attention branch caches its k and v."""
        cache = []
        stem = self.spec.stem
        if stem == "linear":
            x = self.inp(x)
        elif stem == "tied":  # one Linear applied to two independent inputs: not a residual
            x = self.inp(x) + self.inp(ctx)
        elif stem == "pos":
            x = x + self.pos_emb[: x.shape[1]]
        elif stem == "arange_pos":
            ids = torch.arange(x.shape[1], device=x.device) + self.offset
            x = x + self.pos_table[ids]
        for block, b in zip(self.blocks, self.spec.blocks):
            x = block(x, mask, cache)
            if b.after == "relu_half":
                x = x + torch.relu(x) * 0.5
        if self.spec.repeat_last:
            x = self.blocks[-1](x, mask, cache)
        if self.spec.head:
            x = self.head(self.head_norm(x))
        return (x, *cache) if cache else x

    def truth(self) -> Truth:
        t = Truth()
        for i, block in enumerate(self.blocks):
            t.extend(block.truth(f"blocks.{i}"))
        if self.spec.repeat_last:
            last = self.blocks[-1].truth(f"blocks.{len(self.blocks) - 1}")
            t.extend(last.renamed("#1", 1))
        return t

    def inputs(self, seed: int = 0, requires_grad: bool = True):
        g = torch.Generator().manual_seed(seed)
        d = self.spec.d_in if self.spec.stem in ("linear", "tied") else self.spec.width
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())  # not a uint8 kernel weight
        x = torch.randn(BATCH, T, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
        ctx = torch.randn(BATCH, T, d, generator=g, dtype=dtype).requires_grad_(requires_grad)
        mask = torch.randn(T, T, generator=g, dtype=dtype)
        return x, ctx, mask


def build(spec: NetSpec, dtype=torch.float64) -> tuple[Net, Truth]:
    torch.manual_seed(spec.seed)
    net = Net(spec).to(dtype)
    return net, net.truth()


# ---------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------
widths = st.sampled_from([4, 6, 8, 12])
norms = st.sampled_from(["ln", "rms"])


@st.composite
def branch_specs(draw, *, bodies=("single", "mlp", "func", "attn", "nested", "kernel"), nest_depth=0, styles=("pre", "post",
                 "sandwich"), flat_ok=True) -> BranchSpec:
    allowed = [b for b in bodies if b != "nested" or nest_depth < 2]
    body = draw(st.sampled_from(allowed))
    spec = BranchSpec(
        body=body,
        hidden=draw(widths),
        norm=draw(norms),
        style=draw(st.sampled_from(styles)),
        norm_in_block=draw(st.booleans()),
        flat=flat_ok and body in ("single", "mlp") and draw(st.booleans()),
        add=draw(st.sampled_from(ADDS)),
        skip_first=draw(st.booleans()),
        relu_half=body == "mlp" and draw(st.booleans()),
        shape_tensor=body == "mlp" and draw(st.booleans()),
        kernel=draw(st.sampled_from(KERNELS)) if body == "kernel" else "fn",
    )
    if not spec.flat:
        spec = replace(spec, layer_scale=draw(st.booleans()), bias_as=draw(st.booleans()))
    if body == "attn":
        spec = replace(spec, rope=draw(st.booleans()), mask=draw(st.sampled_from(["none", "input", "buffer", "bias", "fill", "ids"])),
                       sdpa=draw(st.booleans()), cache=nest_depth == 0 and draw(st.booleans()),
                       kv_build=draw(st.booleans()))
    if body == "nested":
        # the inner residual runs inside the branch module: pre-norm (norm inside the inner module) or post-norm
        inner = draw(branch_specs(nest_depth=nest_depth + 1, styles=("pre",), flat_ok=False))
        spec = replace(spec, inner=replace(inner, norm_in_block=False), inner_post=draw(st.booleans()),
                       light=False)  # drawn light nests found open cases (issue 10 note); examples cover them
    return spec


@st.composite
def block_specs(draw) -> BlockSpec:
    kind = draw(st.sampled_from(["seq", "seq", "parallel", "projection", "hyper"]))
    after = draw(st.sampled_from(["none", "none", "relu_half"]))
    if kind == "seq":
        branches = tuple(draw(st.lists(branch_specs(), min_size=1, max_size=2)))
        return BlockSpec("seq", branches, after=after)
    if kind == "parallel":
        # both terms at least two compute layers deep: a single-Linear term next to a deeper one
        bodies = ("mlp", "func", "attn", "nested", "single", "kernel")
        # light nests only in seq blocks: in a parallel block the eager FLOPs the oracle measures with
        # FlopCounterMode's module tracker attribute a shared norm's backward to the last term (seen: 2x)
        terms = st.builds(lambda s: replace(s, style="pre", norm_in_block=False, light=False),
                          branch_specs(bodies=bodies, flat_ok=False))
        f, g = draw(terms), draw(terms)
        return BlockSpec("parallel", (f, g), assoc=draw(st.sampled_from(["left", "right", "sum_first"])),
                         shared_ln=draw(st.booleans()), sum_add=draw(st.sampled_from(SUM_ADDS)), after=after)
    if kind == "hyper":  # f at least two layers deep: heavier than the one projection giving pre/post/comb
        f = draw(branch_specs(bodies=("mlp", "func", "attn", "kernel"), styles=("pre",), flat_ok=False))
        return BlockSpec("hyper", (replace(f, hidden=max(f.hidden, 8), norm_in_block=False, cache=False),),
                         after=after, hyper_skip=draw(st.sampled_from(["comb", "identity"])))
    # projection: f = mlp or nested (>= 2 Linear layers, heavier than proj), proj = one Linear.
    # style "pre": f starts with its own norm; "post": it does not (the block may end in a norm: post_norm).
    bodies = ("mlp", "nested", "func", "kernel")
    f = draw(branch_specs(bodies=bodies, styles=("pre", "post"), flat_ok=False))
    f = replace(f, hidden=max(f.hidden, 8), light=False)  # light: a nest without Linear layers of its own
    return BlockSpec("projection", (f,), d_out=draw(widths), post_norm=draw(st.booleans()), after=after)


@st.composite
def net_specs(draw, max_blocks: int = 4) -> NetSpec:
    """A random network of 1..``max_blocks`` blocks."""
    width = draw(widths)
    n = draw(st.integers(1, max_blocks))
    blocks = [draw(block_specs()) for _ in range(n)]
    spec = NetSpec(blocks=tuple(blocks), d_in=draw(widths), width=width,
                   stem=draw(st.sampled_from(["none", "linear", "pos", "arange_pos", "tied"])),
                   repeat_last=blocks[-1].kind != "projection" and draw(st.booleans()),
                   head=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    return spec
