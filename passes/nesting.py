"""Nested residual branches: per nest, gate the level that leaves the most backward FLOPs droppable.

A residual branch can hold other residual branches: short convolutions ``k = k + conv(k)`` inside an
attention branch, a module with a residual of its own at the end of a layer's branch. Gates do not nest
(a gate's branch compiles as one piece), so one level of each nest is gated and the others train every
step. :func:`dropbp_fx.passes.residuals.find_residual_branches` reports the innermost branches as ``branches`` and
the ones holding them as ``nested``; this pass chooses between them.

Before (``find_residual_branches``; ``x + attn_sconv(attn(x))``, with ``k + conv(k)`` inside ``attn`` and
``y + conv(y)`` inside ``attn_sconv``)::

    branches = [attn.k_sconv (5%), attn_sconv (8%)]      nested = [{attn,attn_sconv} (60%)]

After (``choose_nest_levels(analysis, backward_flops)``)::

    branches = [{attn,attn_sconv}]                       nested = [attn.k_sconv, attn_sconv]
    nests    = [Nest(gated=[{attn,attn_sconv}], ungated=[attn.k_sconv, attn_sconv], level="outer", ...)]

The rule, bottom-up over the containment tree: a branch's best is itself or the best of the branches it
holds; itself when its backward FLOPs are at least ``OUTER_MARGIN`` times theirs. The margin keeps the
finer gates where the outer branch adds little compute of its own (an encoder wrapped in one residual
around layers that each have theirs): at one rate, many small gates drop the same FLOPs on average as one
large one, and the published DropBP drops per layer branch. ``backward_flops`` is passed in (the caller
counts them on the graph's shapes), so this pass knows nothing of how.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .residuals import ResidualAnalysis, ResidualBranch

OUTER_MARGIN = 1.25


@dataclass
class Nest:
    """One nest: the level gated, the branches left ungated, and why."""

    gated: list[str]
    ungated: list[str]
    level: str  # "outer" or "inner"
    gated_flops: int  # backward FLOPs of the gated level
    other_flops: int  # ... and of the best other level

    def describe(self) -> str:
        if self.level == "outer":
            why = (f"{self.gated_flops / max(self.other_flops, 1):.1f}x the backward FLOPs of the best choice "
                   f"inside it (>= {OUTER_MARGIN}x)")
        else:
            why = (f"the outer branch has {self.other_flops / max(self.gated_flops, 1):.2f}x their backward FLOPs "
                   f"(< {OUTER_MARGIN}x): the finer gates")
        return f"gated {', '.join(self.gated)} ({self.level}): {why}; ungated: {', '.join(self.ungated)}"


def choose_nest_levels(analysis: ResidualAnalysis,
                       backward_flops: Callable[[ResidualBranch], int]) -> ResidualAnalysis:
    """Gate, per nest, the outer branch or the branches inside it (see the module docstring); in place."""
    if not analysis.nested:
        return analysis
    everything = {b.name: b for b in analysis.branches + analysis.nested}
    members = {name: set(b.nodes) for name, b in everything.items()}
    holds = {name: {o for o, c in everything.items() if o != name and c.add in members[name]}
             for name in everything}  # name -> the names of the branches inside it

    def children(name: str) -> list[str]:  # the branches directly inside ``name``
        return [c for c in holds[name] if not any(c in holds[o] for o in holds[name] if o != c)]

    flops: dict[str, int] = {}
    best: dict[str, list[str]] = {}
    inside_best: dict[str, list[str]] = {}  # the best choice among the branches inside

    def choose(name: str) -> list[str]:
        if name not in best:
            inner = inside_best[name] = [b for c in children(name) for b in choose(c)]
            own = flops.setdefault(name, int(backward_flops(everything[name])))
            best[name] = [name] if not inner or own >= OUTER_MARGIN * sum(flops[b] for b in inner) else inner
        return best[name]

    gated: set[str] = set()
    analysis.nests = []
    for top in [n for n in everything if not any(n in inside for inside in holds.values())]:
        chosen = choose(top)
        gated.update(chosen)
        if holds[top]:
            other = inside_best[top] if top in chosen else [top]
            analysis.nests.append(Nest(chosen, [b for b in everything if b in holds[top] | {top} and b not in chosen],
                                       "outer" if top in chosen else "inner", sum(flops[b] for b in chosen),
                                       sum(flops[b] for b in other)))
    position = {n: i for i, n in enumerate(next(iter(everything.values())).add.graph.nodes)}
    in_order = sorted(everything.values(), key=lambda b: position[b.add])
    analysis.branches = [b for b in in_order if b.name in gated]
    analysis.nested = [b for b in in_order if b.name not in gated]
    return analysis
