"""Which model, frame and ``torch.compile`` call a captured graph belongs to, and the registry behind
:func:`get_dropbp`.

A Dynamo backend receives a ``GraphModule`` and example inputs, nothing else. DropBP needs three facts
torch does not hand it:

* the model the user compiled (the ``_orig_mod`` of the outermost ``OptimizedModule``), to name gates by
  module path across graph breaks, to follow its ``training`` flag and to find its state again;
* the module path of the frame being traced inside that model, when Dynamo compiles a layer's frame on
  its own (a graph break inside a loop over layers): the prefix of that graph's gate names;
* the ``torch.compile(...)`` call (``_TorchCompileWrapper``), so that every graph of one call shares one
  state when the backend is named by string (``backend="dropbp"``).

Where torch has a supported route it is used: the frame's locals come from Dynamo's current
``InstructionTranslator``, and DDPOptimizer's fragments from the ``TracingContext`` it marks
(``ddp_optimizer_ctx``). For the three facts above torch (2.6 to 2.13) offers none: the graph's metadata and
its placeholders' sources name parameters relative to the traced frame, never the compiled root module or
the wrapper. So they are read from the Python call stack, here and nowhere else;
``tests/test_discovery.py`` fails loudly when a torch release changes the frames they rely on.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from dropbp_fx._torch import (current_instruction_translator, current_tracing_context, is_torch_compile_wrapper,
                              optimized_module_class, orig_callable, orig_mod)
from dropbp_fx.distributed import unwrap_ddp

_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model, function or torch.compile call -> DropBP


def register(key, state) -> None:
    """Remember ``state`` for ``key`` (a model, a compiled function or a ``torch.compile`` call), weakly."""
    _REGISTRY[key] = state


def registered(key):
    try:
        return _REGISTRY.get(key)
    except TypeError:  # not weak-referenceable: never registered
        return None


def get_dropbp(model):
    """The :class:`~dropbp_fx.DropBP` state of a model (or function) compiled with ``backend="dropbp"``, after its
    first call.

    ``torch.compile(DistributedDataParallel(model))`` and ``DistributedDataParallel(torch.compile(model))`` work too.
    """
    target = unwrap_ddp(model)
    target = unwrap_ddp(orig_mod(target) or orig_callable(target, target))
    found = registered(target)
    if found is None:
        raise LookupError("no dropbp state for this model: compile it with torch.compile(model, backend='dropbp') "
                          "and run one forward first (Dynamo compiles lazily)")
    return found


def inside_ddp_optimizer() -> bool:
    """Is this graph a fragment that Dynamo's DDPOptimizer cut? (Its ``SubmodCompiler`` marks the tracing context.)"""
    context = current_tracing_context()
    return context is not None and getattr(context, "ddp_optimizer_ctx", None) is not None


def compiled_module(example_inputs) -> tuple[nn.Module | None, str]:
    """The model being compiled, and the module path of the frame Dynamo is tracing inside it.

    The model is the ``_orig_mod`` of the outermost ``OptimizedModule`` on the call stack (or, when a
    function was compiled, the frame local that owns the graph's parameters). When Dynamo falls back
    to compiling nested frames (a graph break inside a loop over layers), the traced frame is a layer,
    and its path (``blocks.1``) prefixes the gate names so that they stay model-wide.
    """
    frame_module = _traced_frame_module(example_inputs)
    if frame_module is False:  # not inside Dynamo (a hand call of the backend)
        return None, ""
    OptimizedModule = optimized_module_class()  # noqa: N806 - a class
    root = None
    for owner in _stack_selves():
        if isinstance(owner, OptimizedModule) and isinstance(orig_mod(owner), nn.Module):
            root = unwrap_ddp(orig_mod(owner))  # gate names without DDP's "module." prefix
    if root is None or frame_module is None or root is frame_module:
        return root or frame_module, ""
    prefix = next((name for name, m in root.named_modules() if m is frame_module), "")
    return root, prefix


def _traced_frame_module(example_inputs):
    """The module among the traced frame's locals owning most of the graph's parameters (None: no module;
    False: not inside Dynamo)."""
    try:
        tx = current_instruction_translator()
    except Exception:  # not inside Dynamo
        return False
    if tx is None:
        return False
    params = {id(t) for t in example_inputs or () if isinstance(t, nn.Parameter)}
    candidates = []
    for value in tx.f_locals.values():  # ``self``, or ``args[0]`` of a decorated forward
        candidates.extend(value if isinstance(value, (tuple, list)) else [value])
    frame_module, best_owned = None, -1
    for value in candidates:
        if isinstance(value, nn.Module):
            owned = sum(id(p) in params for p in value.parameters())
            if owned > best_owned:
                frame_module, best_owned = value, owned
    return frame_module


def compiled_function():
    """The function passed to ``torch.compile`` (``fn`` of torch's ``compile_wrapper`` on the stack), when no
    module was."""
    for frame in _stack():
        if frame.f_code.co_name == "compile_wrapper" and "fn" in frame.f_locals:
            fn = frame.f_locals["fn"]
            try:
                weakref.ref(fn)
            except TypeError:
                return None
            return fn
    return None


def torch_compile_call():
    """The ``torch._TorchCompileWrapper`` of the ``torch.compile(...)`` call whose graph is being compiled."""
    return next((owner for owner in _stack_selves() if is_torch_compile_wrapper(owner)), None)


def _stack():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _stack_selves():
    """``self`` of every frame on the call stack, innermost first."""
    for frame in _stack():
        owner = frame.f_locals.get("self")
        if owner is not None:
            yield owner
