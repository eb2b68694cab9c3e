"""What the backend tells the user about a model: ``DropBPWarning``s (each said once per backend) and the
refusal of models already edited for the published DropBP library."""

from __future__ import annotations

import logging
import warnings

from torch import nn

log = logging.getLogger(__name__)


class DropBPWarning(UserWarning):
    """Something about the model that DropBP handles, but that the user most likely did not intend."""


class Reports:
    """The warnings of one :class:`~dropbp_fx.DropBP`, each said once."""

    def __init__(self) -> None:
        self._warned_no_branch = False
        self._warned_cuts: set[tuple] = set()

    def no_branch(self, index: int, adds: int, gated: bool) -> None:
        """A graph without residual branch in a model with no gate so far is almost always a model DropBP cannot
        help; beside gated graphs it is a loss or a head after a graph break (``explain`` lists it)."""
        log.info("dropbp: graph %d has no residual branch (%d adds looked at); running it unchanged", index, adds)
        if self._warned_no_branch or gated:
            return
        self._warned_no_branch = True
        warnings.warn(
            f"dropbp: graph {index} has no residual branch ({adds} adds looked at), so nothing in it is ever "
            "dropped and it trains exactly as without DropBP. DropBP needs residual adds `x + f(x)` whose branch "
            "f holds a matmul, linear, conv or attention; dropbp_fx.explain(model, *inputs) lists every add and why "
            "it was not gated.", DropBPWarning, stacklevel=5)

    def graph_cut(self, job) -> None:
        """A graph break inside a residual branch: no graph holds its whole ``x + f(x)``, so it is not gated.
        Said by name (the module, the op that broke the graph, Dynamo's fix), once per module and op."""
        from dropbp_fx.passes.breaks import cut_branches, describe_break

        why = describe_break(job.gm)
        if why is None:
            return
        analysis, prefix = job.analysis, job.prefix
        adds = {b.add for b in analysis.branches + analysis.nested} | {b.partial_sum for b in analysis.branches}
        inside = {n for b in analysis.branches + analysis.nested for n in b.nodes}
        cut = cut_branches(job.gm, adds - {None}, job.dbp.model(), inside, _heads(job.model, prefix))
        if not cut:
            return
        cut = [f"{prefix}.{c}" if prefix and c else (c or prefix or "<root>") for c in cut]
        modules = ", ".join(cut[:3]) + (f" (+{len(cut) - 3} more)" if len(cut) > 3 else "")
        job.record.cut = (f"graph {job.record.index} ends inside a residual branch, at {modules}: Dynamo broke the "
                          f"graph there ({why.describe()}), so no graph holds that branch's whole `x + f(x)` and it "
                          f"is not gated (it trains every step). Fix: {why.fix}")
        key = (tuple(cut), why.op, why.detail)
        if key not in self._warned_cuts:
            self._warned_cuts.add(key)
            log.warning("dropbp: %s", job.record.cut)
            warnings.warn(f"dropbp: {job.record.cut}", DropBPWarning, stacklevel=5)

    @staticmethod
    def stream_mutations(branches) -> None:
        """The residual stream changed in place (``x.mul_(s)``, ``relu_``) where a branch reads it.

        The skip then sees the mutated value too, so the mutation is part of the trunk: it stays outside
        the gate and always gets gradient. That is what the model computes, but rarely what was meant.
        """
        from dropbp_fx.passes import graph_view as gv

        for branch in branches:
            if gv.mutates_first_arg(branch.skip) and not gv.is_add(branch.skip):
                warnings.warn(
                    f"dropbp: the residual stream of branch {branch.name!r} is modified in place "
                    f"({branch.skip.name} = {branch.skip.target}) before the residual add, so the skip sees the "
                    "modified value as well: the in-place op stays outside the gate and is never dropped. If the "
                    "branch meant to change only its own input, use the out-of-place op (x = x.mul(s), not "
                    "x.mul_(s)).", DropBPWarning, stacklevel=5)


# The class of the published DropBP library's layer (github.com/WooSunghyeon/dropbp, ``dropbp.layer.DropBP``):
# ``forward`` returns ``input`` or ``input.detach()`` after a Python ``random.random()`` draw.
def _is_published_dropbp_layer(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "DropBP" and (cls.__module__.split(".")[0] == "dropbp"
                                         or all(hasattr(module, a) for a in ("p", "flops", "count")))


def refuse_published_dropbp(model: nn.Module) -> None:
    """A model already edited for the published DropBP library would be dropped twice, and wrongly."""
    found = [name for name, m in model.named_modules() if _is_published_dropbp_layer(m)]
    if found:
        shown = ", ".join(found[:4]) + (f", ... ({len(found)} in all)" if len(found) > 4 else "")
        raise ValueError(
            f"dropbp: the model already contains layers of the published DropBP library ({shown}). Their Python "
            "random.random() draw is frozen into the graph when Dynamo traces it (the same branches would be "
            "dropped, or kept, on every step), and the backend would gate the branches a second time. Use the "
            "unmodified model: the dropbp backend finds the residual branches itself (set the rates with "
            "options={'drop_rate': ...} or dropbp_fx.calibrate, instead of DropBPHandler).")


def _heads(model, prefix: str) -> frozenset[str]:
    """The module path (in the graph's frame) of the model's output head (transformers' ``get_output_embeddings``):
    a graph ending at it ends at the model's output, not inside a residual branch."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return frozenset()
    path = next((n for n, m in model.named_modules() if m is head), None)
    if path is None:
        return frozenset()
    if prefix:
        path = path[len(prefix) + 1:] if path.startswith(prefix + ".") else None
    return frozenset() if path is None else frozenset({path})
