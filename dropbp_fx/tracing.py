"""The Dynamo settings dropbp's own callers trace a model under, and ``dropbp_fx.compile`` that applies them.

Gradient checkpointing as transformers turns it on (``model.gradient_checkpointing_enable()``, Trainer's and TRL's
``gradient_checkpointing=True``): Dynamo traces each checkpointed layer as a ``checkpoint`` higher-order op, which
refuses any write to state outside its body. transformers 5.25 sets a context variable inside every layer (the
``kernels`` hub layers' ``_ACTIVE_KERNEL_FUNCS.set(...)``, reset before the layer returns), so Dynamo broke the graph
inside every checkpointed layer (``HOP: Unsafe side effect ... Attempted to mutate
UserDefinedObjectVariable(CompileableContextVar)``), no residual add was whole, and nothing was gated.

Dynamo's own option for this, ``skip_fwd_side_effects_in_bwd_under_checkpoint``, keeps such a write in the forward
and does not replay it when backward recomputes the layer: exact for a variable set and reset inside the layer, as
these are. It is read while Dynamo traces, which happens inside the compiled model's call, so it is set around
the calls of the models dropbp compiles (:func:`traced_with_our_settings`) and nowhere else: the user's other
``torch.compile`` calls trace under their own settings.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dropbp_fx._torch import compiled_call_impl, dynamo_config, set_compiled_call_impl

SETTINGS = {"skip_fwd_side_effects_in_bwd_under_checkpoint": True}


def traced_with_our_settings(call):
    """``call`` (a compiled model's call), run with :data:`SETTINGS` in force. It runs every forward: the
    settings are swapped by attribute (about 1 us), not through ``config.patch`` (about 40 us)."""
    if getattr(call, "_dropbp_settings", False):
        return call
    config = dynamo_config()

    @functools.wraps(call)
    def run(*args, **kwargs):
        saved = {k: getattr(config, k) for k in SETTINGS}
        for k, v in SETTINGS.items():
            setattr(config, k, v)
        try:
            return call(*args, **kwargs)
        finally:
            for k, v in saved.items():
                setattr(config, k, v)

    run._dropbp_settings = True
    return run


def compile_in_place(owner: str, model: nn.Module, backend) -> None:
    """``model.compile(backend=...)`` traced under :data:`SETTINGS`: the module stays itself (its state dict and
    ``save_pretrained`` keep their names). A model compiled already is refused: ``owner`` must compile it with
    its own backend."""
    if compiled_call_impl(model) is not None:
        raise ValueError(f"{owner}: the model is already compiled (model.compile(...)); pass the uncompiled model "
                         f"and let {owner} compile it")
    model.compile(backend=backend)
    set_compiled_call_impl(model, traced_with_our_settings(compiled_call_impl(model)))


def compile(model: nn.Module, backend=None, **options):  # noqa: A001 - torch.compile's spelling, on purpose
    """``model.compile(backend=dbp)`` in place with :data:`SETTINGS` in force while Dynamo traces it; returns the
    :class:`~dropbp_fx.DropBP` (``options`` make a new one when ``backend`` is None). What the callbacks do, for
    a plain training loop: gradient checkpointing then gates the checkpointed layers too::

        model.gradient_checkpointing_enable()
        dbp = dropbp_fx.compile(model, drop_rate=0.5)
        loss = model(**batch).loss
    """
    from dropbp_fx.backend import DropBP

    if backend is not None and options:
        raise ValueError("dropbp_fx.compile: pass either a DropBP as backend or its options, not both")
    dbp = backend if backend is not None else DropBP(**options)
    compile_in_place("dropbp_fx.compile", model, dbp)
    return dbp
