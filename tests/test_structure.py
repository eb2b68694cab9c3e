"""Who owns what (issue 23): the pipeline's passes return what they found and the backend commits it; each gate's
facts live in the controller's GateState; FLOPs shares and gate names are each made in one place."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import typing
from unittest import mock

import torch
from torch import nn

import dropbp_fx
from dropbp_fx import graph_job, pipeline
from dropbp_fx.gate import DropGate
from dropbp_fx.gate_spec import GateSpec, GateState, flops_shares

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sources() -> dict[str, ast.Module]:
    files = [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]
    return {str(p.relative_to(ROOT)): ast.parse(p.read_text()) for p in files}


def _definitions(name_test) -> list[str]:
    return sorted(f"{path}:{node.name}" for path, tree in _sources().items() for node in ast.walk(tree)
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and name_test(node.name))


def test_the_pipeline_holds_no_reference_to_the_backend_state():
    for cls in (graph_job.GraphJob, graph_job.RewriteInputs, graph_job.GraphResult, graph_job.StepResult):
        hints = typing.get_type_hints(cls, vars(graph_job))
        for f in dataclasses.fields(cls):
            assert "DropBP" not in str(hints[f.name]) and "dbp" not in f.name, (cls.__name__, f.name, hints[f.name])
    dbp = dropbp_fx.DropBP(inner="eager")
    inputs = dbp._rewrite_inputs()
    assert not any(isinstance(getattr(inputs, f.name), dropbp_fx.DropBP) for f in dataclasses.fields(inputs))


def test_passes_return_results_and_write_nowhere():
    """Each pass returns a StepResult; the job's findings are filled by ``rewrite`` from them (``into``)."""
    fields = {f.name for f in dataclasses.fields(graph_job.GraphJob)}
    assert all(step.into is None or step.into in fields for step in pipeline.PIPELINE)
    net = nn.Sequential(*(_Block() for _ in range(2)))
    dbp = dropbp_fx.DropBP(inner="eager")
    gm = torch.fx.symbolic_trace(net)
    before = (list(dbp.graphs), list(dbp.controller.gates))
    results = pipeline.rewrite(gm, None, "", dbp._rewrite_inputs())
    assert (dbp.graphs, dbp.controller.gates) == before  # nothing committed yet
    assert [spec.name for result in results for _, spec in result.gates] == ["0.mlp", "1.mlp"]
    gates = [gate for result in results for gate, _ in result.gates]
    assert all(gate.slot is None for gate in gates)
    assert dbp._commit(results) == 2 and [g.slot for g in gates] == [0, 1]
    assert [g.name for g in dbp.controller.gates] == ["0.mlp", "1.mlp"]
    assert dbp.weights == {"0.mlp": 2 * (8 * 8 + 8), "1.mlp": 2 * (8 * 8 + 8)}  # read from the GateStates


def test_drop_gate_init_registers_nothing():
    controller = mock.Mock()
    gate = DropGate(nn.Identity(), controller, recompute=True, stream_arg=0)
    assert controller.mock_calls == [] and gate.slot is None


def test_only_the_backend_and_a_reused_layer_graph_register_gates():
    """``controller.register`` is called by the backend's commit, and by a gate of a layer-frame graph at the first
    call of another layer (with the spec decided at rewrite time); by nothing else (the controller's own
    ``load_state_dict`` declares gates by name)."""
    callers = []
    for path, tree in _sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register" \
                    and ast.unparse(node.func.value).endswith("controller"):
                callers.append(path)
    assert sorted(callers) == ["dropbp_fx/backend.py", "dropbp_fx/gate.py"], callers


def test_one_flops_share_function():
    assert _definitions(lambda n: "share" in n.lower()) == ["dropbp_fx/gate_spec.py:flops_shares"]
    for path in ("dropbp_fx/backend.py", "dropbp_fx/explain.py", "dropbp_fx/integrations/common.py"):
        assert "flops_shares(" in (ROOT / path).read_text(), path


def test_flops_shares_stand_in_with_parameters_without_shapes():
    counted = [GateState("a", 0.5, flops=(1, 3), weight=10), GateState("b", 0.5, flops=(1, 1), weight=30)]
    assert flops_shares(counted) == ("bwd FLOPs share", [0.75, 0.25])
    counted[1].flops = None
    assert flops_shares(counted) == ("params share", [0.25, 0.75])


def test_one_gate_naming_entry_point():
    """Names are made by ``passes.branch_names.gate_name`` only: nothing assigns a name to a branch or gate."""
    assert _definitions(lambda n: n == "gate_name" or n.endswith("_name") and "gate" in n) == \
        ["passes/branch_names.py:gate_name"]
    from dropbp_fx.passes.residuals import ResidualBranch

    assert isinstance(ResidualBranch.__dict__["name"], property) and ResidualBranch.name.fset is None
    targets = [(path, t) for path, tree in _sources().items() for node in ast.walk(tree)
               for t in (node.targets if isinstance(node, ast.Assign) else
                         [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])]
    assigned = [f"{path}:{t.lineno}" for path, t in targets
                if isinstance(t, ast.Attribute) and t.attr in ("name", "gate_name")]
    assert not assigned, assigned


class _Block(nn.Module):
    def __init__(self, breaks: bool = False) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.breaks = breaks

    def forward(self, x):
        y = x + self.mlp(x)
        if self.breaks:  # Dynamo compiles this frame once and reuses it for the identical layer
            torch._dynamo.graph_break()
        return y


class _Layers(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(breaks=True) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_a_reused_layer_graph_knows_every_layers_gate_when_rewritten():
    torch._dynamo.reset()
    graphs = []
    dbp = dropbp_fx.DropBP(inner="eager")

    def backend(gm, example_inputs):
        graphs.append(dbp(gm, example_inputs))
        return graphs[-1]

    model = _Layers(3)
    torch.compile(model, backend=backend)(torch.randn(4, 8)).backward()
    assert dbp.gate_names == [f"layers.{i}.mlp" for i in range(3)]
    # the graph compiled for layers.0 runs layers.1 too (Dynamo may compile another one for a later layer)
    gate = next(m for m in graphs[0].modules() if isinstance(m, DropGate))
    specs = gate.siblings.specs
    assert set(specs) == {f"layers.{i}" for i in range(3)}
    ran = sorted(set(gate._slots.values()))
    assert len(ran) >= 2  # layers.0 and layers.1 at least ran through it
    for i, state in enumerate(dbp.controller.gates):
        spec = specs[f"layers.{i}"]
        assert isinstance(spec, GateSpec) and spec.name == state.name and spec.flops is not None
        if i in ran:  # registered from this graph's spec (another graph counts its own FLOPs)
            assert spec.flops == state.flops
        assert state.params == {f"layers.{i}.mlp.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        assert state.weight == dbp.controller.gates[0].weight > 0 and state.side_outputs == 0
    torch._dynamo.reset()
