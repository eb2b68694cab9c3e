"""Sensitivity probes around each gate.

Two identity nodes per gate let a calibration read, during one backward pass, what
each residual branch contributes:

* ``probe_in`` on the stream the branch reads: the gradient that flows back into
  the residual stream *through the branch* (it reaches only the gate);
* ``probe_out`` on the branch output: the gradient the residual stream carries at the
  add (what the skip passes down).

Before::

    %g  = call_module[dropbp_gate_0](%x, %w, ...)
    %o  = getitem(%g, 0)
    %h  = add(%x, %o)

After (``insert_probes(gm, is_gate, make_probe)``)::

    %px = call_module[dropbp_probe_0](%x)          # make_probe(gate target, "in")
    %g  = call_module[dropbp_gate_0](%px, %w, ...)
    %o  = getitem(%g, 0)
    %po = call_module[dropbp_probe_1](%o)          # make_probe(gate target, "out")
    %h  = add(%x, %po)

A probe is the identity until a calibration switches it on, and it is opaque to
inner compilers (like a gate), so the compiled pieces never change.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch.fx as fx
from torch import nn

from .outline import free_attr


def insert_probes(gm: fx.GraphModule, is_gate: Callable[[fx.Node], bool],
                  make_probe: Callable[[str, str], nn.Module], prefix: str = "dropbp_probe") -> int:
    """Insert an ``in`` and an ``out`` probe around every gate whose stream argument is known."""
    count = 0
    for call in [n for n in gm.graph.nodes if is_gate(n)]:
        index = call.meta.get("dropbp_stream_arg")
        if index is None:
            continue
        stream = call.args[index]
        attr = free_attr(gm, prefix)
        gm.add_submodule(attr, make_probe(str(call.target), "in"))
        with gm.graph.inserting_before(call):
            probe_in = gm.graph.call_module(attr, (stream,))
        probe_in.meta = dict(stream.meta)
        call.update_arg(index, probe_in)
        first = next((u for u in call.users if u.target is operator.getitem and u.args[1] == 0), None)
        if first is not None:
            attr = free_attr(gm, prefix)
            gm.add_submodule(attr, make_probe(str(call.target), "out"))
            with gm.graph.inserting_after(first):
                probe_out = gm.graph.call_module(attr, (first,))
            probe_out.meta = dict(first.meta)
            first.replace_all_uses_with(probe_out, delete_user_cb=lambda user: user is not probe_out)
        count += 1
    gm.graph.lint()
    gm.recompile()
    return count
