"""Every private torch name the runtime (``dropbp_fx``) uses, in one place: a torch upgrade shows its breakage here.

Each name has a ``# why:`` comment: what it is needed for, and the public replacement where one exists (used
instead wherever it works: ``torch.compiler.list_backends``, ``torch.compiler.reset``, ``is_concrete_int``,
``F.linear``). Names under ``torch._dynamo`` / ``torch._inductor`` / ``torch._subclasses`` / ``torch._functorch``
are imported inside the functions, as the callers did: importing them at module import is slow (and Inductor's
would be cyclic while torch itself imports). ``tests/test_private_torch.py`` checks that no other module of the
package uses a private torch name, and that each name here has its reason. One exception: the oracle
(``dropbp_fx/testing.py``) imports nothing of the project, so it imports ``torch.utils._pytree`` itself (pytree
flattening of nested outputs; no public pytree module in torch 2.6-2.13).
"""

from __future__ import annotations

import torch

# why: Dynamo's config (``skip_fwd_side_effects_in_bwd_under_checkpoint``, read while tracing); no public config
def dynamo_config():
    import torch._dynamo

    return torch._dynamo.config


# why: where ``nn.Module.compile()`` keeps the compiled call (to wrap it, and to refuse a compiled model); no
# public accessor
def compiled_call_impl(module):
    return getattr(module, "_compiled_call_impl", None)


# why: see compiled_call_impl (setting it is how ``Module.compile`` installs the call)
def set_compiled_call_impl(module, call) -> None:
    module._compiled_call_impl = call


# why: is autograd running a backward (recomputing a checkpointed region calls forward code inside it)? no
# public query
def in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


# why: the model inside ``torch.compile(model)``'s ``OptimizedModule``; no public accessor
def orig_mod(compiled, default=None):
    return getattr(compiled, "_orig_mod", default)


# why: the function inside ``torch.compile(fn)`` (Dynamo's wrapper keeps it); no public accessor
def orig_callable(compiled, default=None):
    return getattr(compiled, "_torchdynamo_orig_callable", default)


# why: the class of ``torch.compile(module)``'s result, to find the compiled model on the stack; no public name
def optimized_module_class():
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


# why: the wrapper of one ``torch.compile(...)`` call (a state per call); private class, no public name
def is_torch_compile_wrapper(obj) -> bool:
    return type(obj).__name__ == "_TorchCompileWrapper"


# why: Dynamo's tracing context (DDPOptimizer marks it); no public accessor
def current_tracing_context():
    import torch._guards

    return torch._guards.TracingContext.try_get()


# why: the frame Dynamo is tracing (its locals name the traced module); raises outside Dynamo; no public API
def current_instruction_translator():
    from torch._dynamo.symbolic_convert import InstructionTranslator

    return InstructionTranslator.current_tx()


# why: the ``DistributedDataParallel`` whose forward is running; private classmethod of DDP, no public one
def active_ddp_module(ddp_class):
    return ddp_class._get_active_ddp_module()


# why: Dynamo's graph-break counts (explain); the public ``torch._dynamo.explain`` reruns the model, this does not
def graph_break_counters():
    import torch._dynamo.utils

    return torch._dynamo.utils.counters["graph_break"]


# why: a Dynamo backend by name (the inner compiler); public ``torch.compiler.list_backends`` lists names only
def lookup_backend(name):
    import torch._dynamo

    return torch._dynamo.lookup_backend(name)


# why: Inductor's ``compile_fx`` module: ``compile_fx(..., inner_compile=...)`` to compile our pieces under
# the workarounds (read at call time: tests spy on ``compile_fx_inner``); no public inner_compile hook
def inductor_compile_fx():
    import torch._inductor.compile_fx

    return torch._inductor.compile_fx


# why: Inductor's ``sizevars`` (the simplify workaround, pytorch/pytorch#186319, patches its stride functions)
def inductor_sizevars():
    from torch._inductor import sizevars

    return sizevars


# why: Inductor's C++ codegen (both workarounds patch it: #186319, #191837)
def inductor_cpp():
    from torch._inductor.codegen import cpp

    return cpp


# why: Inductor's config (``cpp.dynamic_threads``, read by the #191837 fix); the public ``torch.compile(options=)``
# sets it for a whole compile, not read it
def inductor_config():
    from torch._inductor import config

    return config


# why: fake tensors: a graph's fake values are ``FakeTensor`` instances; no public class
def is_fake_tensor(value) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(value, FakeTensor)


# why: a fake mode of our own (shape propagation, static fakes for a piece); no public constructor
def fake_tensor_mode(**kwargs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(**kwargs)


# why: what ``.item()`` of a fake 0-d tensor returns (a dynamic float's symbol), lost by ``from_tensor``; private
def item_memo(fake):
    return fake.item_memo


# why: see item_memo
def set_item_memo(fake, memo) -> None:
    fake.item_memo = memo


# why: AOTAutograd's config (``view_replay_for_aliased_outputs``, for our pieces only); no public config
def functorch_config_patch(**changes):
    import torch._functorch.config

    return torch._functorch.config.patch(**changes)


# why: a tracing context of its own per piece (AOTAutograd keeps its metadata there); no public API
def tracing(fake_mode):
    import torch._guards

    return torch._guards.tracing(torch._guards.TracingContext(fake_mode))


# why: the fake mode of a graph's fake values; no public API
def detect_fake_mode(values):
    import torch._guards

    return torch._guards.detect_fake_mode(values)
