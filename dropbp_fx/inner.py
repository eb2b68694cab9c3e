"""Inner compilers for the pieces of a gated graph.

The backend splits a gated graph into trunk segments and branches
(:mod:`dropbp_fx.passes.segments`). Each piece compiles on its first call, from the real
tensors it is called with, with the inner compiler:

* a trunk segment: once, as a training graph;
* a branch: twice, as a training graph (open gate) and as an inference graph
  compiled under ``no_grad`` (closed gate: nothing saved). A training graph called
  under ``no_grad`` would still save activations: AOTAutograd turns grad back on.

Pieces are cached by structure (ops and wiring, not node names), input metadata and
grad mode, so identical layers share one compiled artifact: an 8-layer model
compiles as many pieces as a 1-layer one. Changing masks never recompiles.

Graphs with symbolic sizes (``dynamic=True``, or the automatic dynamic shapes Dynamo
switches to when a size changes) are different: a piece compiled from real tensors would
be specialised on their sizes. Their pieces compile at once, while Dynamo is still
tracing, from the graph's own fake tensors, with its symbolic sizes: each compiles once
for all sizes, and whatever the inner compiler assumes about the sizes becomes a guard
of the Dynamo graph. See :class:`Compiled`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import types

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from dropbp_fx._torch import (detect_fake_mode, fake_tensor_mode, functorch_config_patch, inductor_compile_fx,
                              inductor_config, inductor_cpp, inductor_sizevars, is_fake_tensor, item_memo,
                              lookup_backend, set_item_memo, tracing)
from dropbp_fx.config import NAMED_INNER
from dropbp_fx.passes.graph_view import structure_key
from dropbp_fx.shapes import node_value

log = logging.getLogger(__name__)
graph_log = logging.getLogger("dropbp_fx.graphs")

INNER_COMPILERS = NAMED_INNER  # the inner compilers CI tests; any Dynamo backend works (see inner_backend)


def inner_backend(inner):
    """The ``(gm, example_inputs) -> callable`` compiler for ``inner``: a callable as it is, ``"inductor"`` with the
    workarounds of :func:`inductor_workarounds`, any other name through Dynamo's backend registry
    (``torch.compiler.list_backends(exclude_tags=())``: ``aot_eager``, ``cudagraphs``, a backend a library
    registers)."""
    if callable(inner):
        return inner
    if inner == "inductor":
        return _inductor
    return lookup_backend(inner)


def _inductor(gm: fx.GraphModule, example_inputs):
    """Inductor, with the workarounds of :func:`inductor_workarounds` in force while it compiles a piece's
    forward or backward graph (AOTAutograd compiles the backward lazily, through the same ``inner_compile``)."""
    compile_fx = inductor_compile_fx()

    def inner_compile(*args, **kwargs):
        with inductor_workarounds():
            return compile_fx.compile_fx_inner(*args, **kwargs)

    return compile_fx.compile_fx(gm, example_inputs, inner_compile=inner_compile)


NO_WORKAROUNDS_ENV = "DROPBP_NO_INDUCTOR_WORKAROUNDS"  # =1: compile our pieces with torch's Inductor as it is
_WORKAROUND_LOCK = threading.RLock()  # one patched compile at a time (Inductor's module state is process-wide)
# torch releases whose C++ vectorisation analysis calls sympy.simplify unbounded (pytorch/pytorch#186319):
# [first, end). 2.13 is the newest release checked (a 2.14 pre-release counts as before 2.14); move the end
# after checking a newer release.
SIMPLIFY_AFFECTED = ("2.3", "2.14")
# torch releases whose CppTile2DKernel.store applies transform_indexing twice in atomic_add mode
# (pytorch/pytorch#191837, fixed upstream by pytorch/pytorch#191861): [first, end), as SIMPLIFY_AFFECTED (2.6: the
# oldest torch we support; 2.13: the newest checked); move the end to the first release with the fix.
TILE2D_AFFECTED = ("2.6", "2.14")
CACHE_KEY_TAG = "dropbp-inductor-workarounds-1"  # our patched compiles' FX-graph / AOTAutograd cache entries


def workarounds_enabled() -> bool:
    return os.environ.get(NO_WORKAROUNDS_ENV, "") in ("", "0")


@contextlib.contextmanager
def inductor_workarounds():
    """Every Inductor workaround of ours, for the compiles in this block only (under a lock), unless
    ``DROPBP_NO_INDUCTOR_WORKAROUNDS=1``: :func:`tile2d_atomic_add_fix` and :func:`simplify_by_expand`.

    Inductor's FX-graph and AOTAutograd caches key an artifact by the graph, inputs and configs, not by patched
    functions; so that an artifact compiled under our patches is never served to the user's own
    ``torch.compile`` of the same graph (nor theirs to us), our compiles run with ``torch.compiler.config.
    cache_key_tag`` extended by :data:`CACHE_KEY_TAG` (both kinds of artifact are correct code; they may
    vectorise differently)."""
    if not workarounds_enabled():
        yield
        return
    tag = torch.compiler.config.cache_key_tag
    with _WORKAROUND_LOCK, torch.compiler.config.patch(cache_key_tag=f"{tag}+{CACHE_KEY_TAG}" if tag else CACHE_KEY_TAG), \
            tile2d_atomic_add_fix(), simplify_by_expand():
        yield


def _affected(bounds) -> bool:
    first, end = bounds
    return first <= torch.__version__ < end  # a TorchVersion: compared as versions


def _simplify_affected() -> bool:
    return _affected(SIMPLIFY_AFFECTED)


_SIMPLIFY_NAMES = ("stride_at", "simplify_index_in_vec_range", "stride_at_vec_range")
_EXPAND_VARIANTS: list[dict] = []  # [{name: the variant}], made once


class _SympyExpanding(types.ModuleType):
    """``sympy`` with ``simplify`` = ``expand``, for the variants' globals only."""

    def __init__(self, sympy):
        super().__init__("sympy")
        self.__dict__.update(sympy.__dict__)
        self.simplify = lambda expr, *args, **kwargs: sympy.expand(expr)


def _expand_variants(sizevars) -> dict:
    """Copies of sizevars' ``stride_at``, ``simplify_index_in_vec_range`` and ``stride_at_vec_range`` (the same
    code) whose ``sympy.simplify`` is ``sympy.expand``, each with an lru cache of its own (torch's caches never
    see their results) and calling each other; {} where this Inductor lacks one of them."""
    if not _EXPAND_VARIANTS:
        originals = {n: getattr(sizevars, n, None) for n in _SIMPLIFY_NAMES}
        variants = {}
        if all(hasattr(f, "__wrapped__") and hasattr(f, "cache_clear") for f in originals.values()):
            g = dict(vars(sizevars))
            g["sympy"] = _SympyExpanding(g["sympy"])
            for n, f in originals.items():
                raw = f.__wrapped__
                variants[n] = functools.lru_cache(types.FunctionType(raw.__code__, g, raw.__name__, raw.__defaults__,
                                                                     raw.__closure__))
            g.update(variants)  # the variants call each other
        _EXPAND_VARIANTS.append(variants)
    return _EXPAND_VARIANTS[0]


@contextlib.contextmanager
def simplify_by_expand():
    """Work around pytorch/pytorch#186319, for the compiles in this block only, and only on the torch releases
    of :data:`SIMPLIFY_AFFECTED`: Inductor's C++ backend asks ``sympy.simplify`` for the stride of every index
    along a vectorised loop variable (``sizevars.stride_at`` and ``simplify_index_in_vec_range``, from
    ``codegen/cpp.py``'s tiling and load analysis), and ``simplify`` has no bound: on Funnel's attention after
    its second pooling (indices of nested ``FloorDiv`` / ``ModularIndexing``) one call took 66-146 s, and the
    model never finished compiling, with plain ``torch.compile(backend="inductor")`` as with ours. ``expand``
    (what the strides of affine indices need: ``64*(x1 + 1) + x0 - (64*x1 + x0) = 64``) is bounded. Where it
    leaves a stride symbolic that ``simplify`` would have reduced, Inductor takes its general path (a strided
    or gathered load instead of a contiguous vector load): the same values, maybe slower code. The code emitted
    with a symbolic stride is the same expression, equal by construction. Outside the block, and so in the
    user's own ``torch.compile``, sizevars' and codegen/cpp's functions (and their lru caches) are torch's own."""
    if not _simplify_affected():
        yield
        return
    sizevars, cpp = inductor_sizevars(), inductor_cpp()

    variants = _expand_variants(sizevars)
    if not variants:
        yield
        return
    saved = [(sizevars, n, getattr(sizevars, n)) for n in _SIMPLIFY_NAMES]
    if hasattr(cpp, "stride_at_vec_range"):  # imported by name
        saved.append((cpp, "stride_at_vec_range", cpp.stride_at_vec_range))
    for module, name, _ in saved:
        setattr(module, name, variants[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


_TILE2D_BUGGY: list[bool] = []  # [whether the installed Inductor has the bug], once checked


@contextlib.contextmanager
def tile2d_atomic_add_fix():
    """Work around an Inductor CPU codegen bug that writes out of bounds (pytorch/pytorch#191837; the upstream fix,
    pytorch/pytorch#191861, does the same), for the compiles in this block only, and only on the torch releases
    with the bug (:data:`TILE2D_AFFECTED`, by version; ``DROPBP_NO_INDUCTOR_WORKAROUNDS=1`` turns it off). Outside the
    block, and so in the user's own ``torch.compile`` calls, ``CppTile2DKernel.store`` is torch's own.

    In a 2-D tiled C++ kernel (``CppTile2DKernel``: a transposed load fused with other work), a store in
    ``atomic_add`` mode (``index_put(accumulate=True)``: the backward of advanced indexing such as Falcon's
    ``fused_qkv[..., [-2], :]``) that is not itself transposed has ``transform_indexing`` (the tile's inner offset)
    applied twice when the kernel runs on more than one thread: ``CppTile2DKernel.store`` applies it, then
    ``CppVecKernel.store`` re-derives the index through ``ops.index_expr``, which ``CppTile2DOverrides`` transforms
    again. The scatter then writes up to one tile past the buffer: heap corruption (segfaults, glibc "corrupted
    double-linked list") in the backward of whatever piece Inductor fused that way. Falcon's attention branch does
    so when compiled as a DropBP piece (its KV-cache outputs put a transposed gradient in the same kernel); plain
    ``torch.compile`` fuses the whole model differently and happens not to. Fix (as upstream): for that path, hand
    ``CppVecKernel.store`` the untransformed index, so the offset is applied once."""
    config, cpp = inductor_config(), inductor_cpp()

    if not _TILE2D_BUGGY:
        _TILE2D_BUGGY.append(_has_tile2d_bug(cpp))
    if not _TILE2D_BUGGY[0]:
        yield
        return
    buggy_store = cpp.CppTile2DKernel.store

    def store(self, name, index, value, mode=None):
        if (mode == "atomic_add" and (config.cpp.dynamic_threads or self.num_threads != 1)
                and not self.need_vec_transpose(self.rename_indexing(index))):
            # the parallel atomic_add path of CppVecKernel.store transforms the index itself
            return cpp.CppVecKernel.store(self, name, index, value, mode)
        return buggy_store(self, name, index, value, mode)

    cpp.CppTile2DKernel.store = store
    try:
        yield
    finally:
        cpp.CppTile2DKernel.store = buggy_store


def _has_tile2d_bug(cpp) -> bool:
    """Does this Inductor have pytorch/pytorch#191837? Decided by the torch version (:data:`TILE2D_AFFECTED`), not
    by reading torch's source; an Inductor without the methods the fix calls is left alone."""
    needed = [(cpp, "CppTile2DKernel"), (cpp, "CppVecKernel")]
    present = all(hasattr(m, n) for m, n in needed) and all(
        hasattr(cpp.CppTile2DKernel, n) for n in ("store", "need_vec_transpose", "rename_indexing"))
    buggy = _affected(TILE2D_AFFECTED) and present
    log.debug("dropbp: torch %s: Inductor's CppTile2DKernel.store %s pytorch/pytorch#191837", torch.__version__,
              "has" if buggy else "is free of")
    return buggy


def input_key(args) -> tuple:
    """Shapes, strides, dtypes, devices, grad flags, and which arguments are the same tensor
    (AOTAutograd compiles duplicated inputs away, so that pattern is part of the artifact)."""
    key, first = [], {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):  # symbolic sizes (fake tensors of a dynamic graph) by name: s0, s1 + 1, ...
            key.append((tuple(map(_size, a.shape)), tuple(map(_size, a.stride())), a.dtype, a.device,
                        a.requires_grad, isinstance(a, nn.Parameter), first.setdefault(id(a), i)))
        else:
            key.append(repr(a))
    return tuple(key)


def _size(n):
    if isinstance(n, torch.SymInt):
        # a SymInt that is a known constant (16) is keyed like the int 16 (is_concrete_int: no guard)
        return int(n) if is_concrete_int(n) else str(n)
    return n


def autocast_state() -> tuple:
    """The autocast dtypes in force: a piece traced under autocast has its casts baked in, so an artifact
    compiled without autocast must not serve an autocast graph (Dynamo compiles one graph per state), nor
    the reverse (the ops of an fp32 artifact would be autocast again at run time, but not its backward)."""
    return tuple((device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device))


def is_symbolic(value) -> bool:
    """A symbolic number, or a (fake) tensor, or a tuple of them, with a symbolic size or stride."""
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(value, torch.Tensor):
        return any(isinstance(n, torch.SymInt) for n in (*value.shape, *value.stride()))
    if isinstance(value, (tuple, list)):
        return any(is_symbolic(v) for v in value)
    return False


def in_mode(mode, value):
    """``value`` as a fake tensor of ``mode`` (Dynamo hands its backend a fake mode of its own, over the same
    shape environment, while the graph's metadata holds the fake tensors it traced with), keeping what
    ``.item()`` returns: a float Dynamo made dynamic is a 0-d tensor whose ``.item()`` is its symbol, known
    only to the traced fake tensor (AOTAutograd's own conversion drops it, and ``.item()`` then fails with
    ``DataDependentOutputException``)."""
    if not is_fake_tensor(value) or value.fake_mode is mode:
        return value
    memo = item_memo(value)
    converted = mode.from_tensor(value)
    if memo is not None:
        set_item_memo(converted, memo)
    return converted


def _static_fakes(args):
    """A fake mode with a shape environment, and ``args``' tensors as its fake tensors of static sizes: what
    Dynamo hands a backend. Without a shape environment AOTAutograd makes a mode that cannot trace an op whose
    output size depends on data (T5Gemma2's ``embeds[ids == eoi] = e``: ``index_put`` with a boolean mask,
    whose backward runs ``nonzero``: ``DynamicOutputShapeException``)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = fake_tensor_mode(shape_env=ShapeEnv(), static_shapes=True)
    return mode, [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]


def _no_view_replay():
    """AOTAutograd regenerates an output that is a view of another (a compressor's ``kv`` and
    ``kv[:, :16].view(...)``, both returned by one trunk segment) by replaying the recorded views; under
    Inductor the replayed sizes came out as garbage (``invalid shape dimension -1839543646254204612``,
    DeepSeek-V4, torch 2.13, some runs only; torch's own comment says view replay is not compatible with its
    AOTAutograd cache). ``as_strided`` regeneration, torch's other documented path, is exact. The flag is read
    when a piece is compiled, so this holds for our pieces only."""
    return functorch_config_patch(view_replay_for_aliased_outputs=False)


class CompileCache:
    """Compiled pieces of one :class:`~dropbp_fx.DropBP`, shared by all of its graphs."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self._fns: dict[tuple, object] = {}
        self.compiles = 0
        self.hits = 0
        self.seconds = 0.0

    def get(self, gm: fx.GraphModule, args, training: bool, scope=None):
        """The compiled ``gm`` for ``args`` (real tensors, or the fake tensors of one graph: ``scope`` is then
        their fake mode, so that artifacts specialised under one graph's guards serve only that graph)."""
        key = (structure_key(gm), input_key(args), training, autocast_state(), scope)
        fn = self._fns.get(key)
        if fn is not None:
            self.hits += 1
            return fn
        if graph_log.isEnabledFor(logging.DEBUG):
            graph_log.debug("dropbp: %s piece for %s:\n%s", "training" if training else "inference", self.inner,
                            gm.print_readable(print_output=False))
        start = time.perf_counter()
        # a graph's fake tensors: a tracing context of its own (each piece keeps its own AOTAutograd metadata,
        # which its backward, compiled lazily, looks up), over the graph's fake mode and its shape environment
        if scope is None:  # real tensors: fake ones of static sizes, over a shape environment of their own
            scope, args = _static_fakes(args)
        with torch.set_grad_enabled(training), tracing(scope), \
                _no_view_replay():
            fn = inner_backend(self.inner)(gm, list(args))
        self.seconds += time.perf_counter() - start
        self._fns[key] = fn
        self.compiles += 1
        log.debug("dropbp: compiled a %s piece with %s (%d so far)", "training" if training else "inference",
                  self.inner, self.compiles)
        return fn


class Compiled(nn.Module):
    """A graph piece compiled with the inner compiler.

    ``training=False`` compiles an inference graph (called under ``no_grad``).

    Static sizes: the piece compiles on its first call, from the real tensors. An artifact
    is specialised on which inputs require grad (AOTAutograd computes no gradient for an
    input that did not), and that changes with the mask: a trunk segment after a closed
    gate receives a tensor without grad. So the pieces look their artifact up by that
    pattern on every call.

    Symbolic sizes (a node's value has a symbolic size, and the graph's fake tensors are at
    hand, as in a graph Dynamo is tracing): the piece compiles now, once, from those fake
    tensors, so one artifact serves every size and the inner compiler's assumptions about
    sizes become guards of the Dynamo graph (a real-tensor compile would be specialised on
    the first sizes, and lazily added guards would never be checked). It is compiled for the
    inputs that required grad when the graph was traced (every gate open): a closed gate's
    output without grad only makes a gradient it computes go unused. A call with an input
    requiring grad that did not then (never seen in training) runs the piece uncompiled.
    """

    def __init__(self, gm: fx.GraphModule, cache: CompileCache, training: bool) -> None:
        super().__init__()
        self.gm = gm
        self.cache = cache
        self.training_graph = training
        self._fns: dict[tuple, object] = {}
        self._symbolic = None  # the artifact compiled from fake tensors with symbolic sizes
        self._no_grad_inputs: list[int] = []  # inputs it was compiled as not requiring grad
        self._dynamic = any(is_symbolic(node_value(n)) for n in gm.graph.nodes)
        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        scope = detect_fake_mode(fakes) if self._dynamic and None not in fakes else None
        if scope is not None and scope.shape_env is not None:
            fakes = [in_mode(scope, f) for f in fakes]
            self._symbolic = cache.get(gm, fakes, training, scope)
            self._no_grad_inputs = [i for i, a in enumerate(fakes)
                                    if isinstance(a, torch.Tensor) and not a.requires_grad]

    def forward(self, *args):
        if self._symbolic is not None:
            if self.training_graph and torch.is_grad_enabled() and any(args[i].requires_grad
                                                                        for i in self._no_grad_inputs):
                return self.gm(*args)
            return self._symbolic(*args)
        if self._dynamic:  # symbolic sizes without fake tensors (not traced by Dynamo): by sizes too
            key = tuple(tuple(a.shape) + (a.requires_grad,) if isinstance(a, torch.Tensor) else a for a in args)
        elif self.training_graph:
            key = tuple(a.requires_grad for a in args if isinstance(a, torch.Tensor))
        else:
            key = ()
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self.cache.get(self.gm, args, self.training_graph)
        return fn(*args)  # a Dynamo backend's artifact takes the arguments unpacked
