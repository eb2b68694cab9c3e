"""Pure ``GraphModule -> GraphModule`` passes of dropbp-fx (installed as ``dropbp_fx.passes``).

They depend on torch and networkx only: what the runtime puts into a graph (a gate module, a compiled
piece) is passed in as a factory. The order the backend runs them in is
:data:`dropbp_fx.pipeline.PIPELINE`; ``docs/architecture.md`` draws it.

* :func:`find_residual_branches` (analysis): the residual branches of a graph.
* :func:`gate_residual_branches` (rewrite): each branch into a gate module made by a factory.
"""

from .residuals import ResidualAnalysis, ResidualBranch, SkippedAdd, find_residual_branches
from .gating import gate_residual_branches

__all__ = ["ResidualAnalysis", "ResidualBranch", "SkippedAdd", "find_residual_branches", "gate_residual_branches"]
