"""What the backend tells the user about a model: ``DropBPWarning``s (each said once per backend) and the
refusal of models already edited for the published DropBP library."""

from __future__ import annotations

import logging
import warnings

from torch import nn

log = logging.getLogger(__name__)
STACKLEVEL = 4  # warn -> DropBP._commit -> DropBP.__call__ or .transform -> their caller (torch, the user)


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
        if self._warned_no_branch or gated:
            return
        self._warned_no_branch = True
        warnings.warn(
            f"dropbp: graph {index} has no residual branch ({adds} adds looked at), so nothing in it is ever "
            "dropped and it trains exactly as without DropBP. DropBP needs residual adds `x + f(x)` whose branch "
            "f holds a matmul, linear, conv or attention; dropbp_fx.explain(model, *inputs) lists every add and why "
            "it was not gated.", DropBPWarning, stacklevel=STACKLEVEL)

    def graph_cut(self, message: str, key: tuple) -> None:
        """A graph break inside a residual branch (found by the pipeline's ``breaks`` pass: the module, the op that
        broke the graph, Dynamo's fix): no graph holds its whole ``x + f(x)``, so it is not gated. Said once per
        module and op."""
        if key not in self._warned_cuts:
            self._warned_cuts.add(key)
            log.warning("dropbp: %s", message)
            warnings.warn(f"dropbp: {message}", DropBPWarning, stacklevel=STACKLEVEL)

    @staticmethod
    def stream_mutations(branches) -> None:
        """The residual stream changed in place (``x.mul_(s)``, ``relu_``) where a branch reads it (the pipeline's
        ``streams`` pass finds them).

        The skip then sees the mutated value too, so the mutation is part of the trunk: it stays outside
        the gate and always gets gradient. That is what the model computes, but rarely what was meant.
        """
        for branch in branches:
            warnings.warn(
                f"dropbp: the residual stream of branch {branch.name!r} is modified in place "
                f"({branch.skip.name} = {branch.skip.target}) before the residual add, so the skip sees the "
                "modified value as well: the in-place op stays outside the gate and is never dropped. If the "
                "branch meant to change only its own input, use the out-of-place op (x = x.mul(s), not "
                "x.mul_(s)).", DropBPWarning, stacklevel=STACKLEVEL)


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
