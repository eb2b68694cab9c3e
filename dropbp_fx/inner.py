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

import logging
import time

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from dropbp_fx._torch import (detect_fake_mode, fake_tensor_mode, functorch_config_patch, inductor_compile_fx,
                              is_fake_tensor, item_memo, lookup_backend, set_item_memo, tracing)
from dropbp_fx.config import NAMED_INNER
from dropbp_fx.inductor_fixes import inductor_workarounds
from dropbp_fx.passes.graph_view import structure_key
from dropbp_fx.shapes import node_value

log = logging.getLogger(__name__)
graph_log = logging.getLogger("dropbp_fx.graphs")

INNER_COMPILERS = NAMED_INNER  # the inner compilers CI tests; any Dynamo backend works (see inner_backend)


def inner_backend(inner):
    """The ``(gm, example_inputs) -> callable`` compiler for ``inner``: a callable as it is, ``"inductor"`` with the
    workarounds of :mod:`dropbp_fx.inductor_fixes`, any other name through Dynamo's backend registry
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
