"""The Inductor workarounds of our own compiles: two torch bugs, patched only while Inductor compiles one of our
pieces (:func:`inductor_workarounds`, entered by :func:`dropbp_fx.inner.inner_backend`'s ``"inductor"``), under a
lock, each decided by a torch version bound:

* pytorch/pytorch#186319: the C++ vectorisation analysis calls ``sympy.simplify`` without bound
  (:func:`simplify_by_expand`);
* pytorch/pytorch#191837: ``CppTile2DKernel.store`` applies ``transform_indexing`` twice in ``atomic_add`` mode
  (:func:`tile2d_atomic_add_fix`).

``DROPBP_NO_INDUCTOR_WORKAROUNDS=1`` compiles our pieces with torch's Inductor as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import types

import torch

from dropbp_fx._torch import inductor_config, inductor_cpp, inductor_sizevars

log = logging.getLogger(__name__)

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
