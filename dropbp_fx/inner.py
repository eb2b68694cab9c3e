"""Inner compilers for the pieces of a gated graph.

The backend splits a gated graph into trunk segments and branches
(:mod:`passes.segments`). Each piece compiles on its first call, from the real
tensors it is called with, with the inner compiler:

* a trunk segment: once, as a training graph;
* a branch: twice, as a training graph (open gate) and as an inference graph
  compiled under ``no_grad`` (closed gate: nothing saved). A training graph called
  under ``no_grad`` would still save activations: AOTAutograd turns grad back on.

Pieces are cached by structure (ops and wiring, not node names), input metadata and
grad mode, so identical layers share one compiled artifact: an 8-layer model
compiles as many pieces as a 1-layer one. Changing masks never recompiles.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx
from torch import nn

from passes.graph_view import structure_key

log = logging.getLogger("dropbp_fx")

INNER_COMPILERS = ("eager", "aot_eager", "inductor")


def inner_backend(inner: str):
    """The ``(gm, example_inputs) -> callable`` compiler for an inner-compiler name."""
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        return compile_fx
    raise ValueError(f"no compiler for inner={inner!r}; choose one of {INNER_COMPILERS}")


def input_key(args) -> tuple:
    """Shapes, strides, dtypes, devices, grad flags, and which arguments are the same tensor
    (AOTAutograd compiles duplicated inputs away, so that pattern is part of the artifact)."""
    key, first = [], {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad, isinstance(a, nn.Parameter),
                        first.setdefault(id(a), i)))
        else:
            key.append(repr(a))
    return tuple(key)


class CompileCache:
    """Compiled pieces of one :class:`~dropbp_fx.DropBP`, shared by all of its graphs."""

    def __init__(self, inner: str) -> None:
        self.inner = inner
        self._fns: dict[tuple, object] = {}
        self.compiles = 0
        self.hits = 0
        self.seconds = 0.0

    def get(self, gm: fx.GraphModule, args, training: bool):
        key = (structure_key(gm), input_key(args), training)
        fn = self._fns.get(key)
        if fn is not None:
            self.hits += 1
            return fn
        start = time.perf_counter()
        with torch.set_grad_enabled(training):
            fn = inner_backend(self.inner)(gm, list(args))
        self.seconds += time.perf_counter() - start
        self._fns[key] = fn
        self.compiles += 1
        log.debug("dropbp: compiled a %s piece with %s (%d so far)", "training" if training else "inference",
                  self.inner, self.compiles)
        return fn


class Compiled(nn.Module):
    """A graph piece that compiles itself with the inner compiler on its first call.

    ``training=False`` compiles an inference graph (called under ``no_grad``). An artifact
    is specialised on which inputs require grad (AOTAutograd computes no gradient for an
    input that did not), and that changes with the mask: a trunk segment after a closed
    gate receives a tensor without grad. So the pieces look their artifact up by that
    pattern on every call (and by input shapes, in graphs with symbolic sizes).
    """

    def __init__(self, gm: fx.GraphModule, cache: CompileCache, training: bool) -> None:
        super().__init__()
        self.gm = gm
        self.cache = cache
        self.training_graph = training
        self._dynamic = any(isinstance(n.meta.get("example_value"), torch.SymInt)
                            for n in gm.graph.nodes if n.op == "placeholder")
        self._fns: dict[tuple, object] = {}

    def forward(self, *args):
        if self._dynamic:
            key = tuple(tuple(a.shape) + (a.requires_grad,) if isinstance(a, torch.Tensor) else a for a in args)
        elif self.training_graph:
            key = tuple(a.requires_grad for a in args if isinstance(a, torch.Tensor))
        else:
            key = ()
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = self.cache.get(self.gm, args, self.training_graph)
        return fn(*args)  # a Dynamo backend's artifact takes the arguments unpacked
