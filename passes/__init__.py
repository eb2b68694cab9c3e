"""Pure ``GraphModule -> GraphModule`` passes of dropbp-fx.

* :func:`find_residual_branches` (analysis): the residual branches of a graph.
* :func:`gate_residual_branches` (rewrite): each branch into a gated drop-backward call.
"""

from passes.residuals import ResidualAnalysis, ResidualBranch, SkippedAdd, find_residual_branches
from passes.gating import GateResidualBranches, gate_residual_branches

__all__ = ["GateResidualBranches", "ResidualAnalysis", "ResidualBranch", "SkippedAdd", "find_residual_branches",
           "gate_residual_branches"]
