"""The shape of the code and of the installed package: what issue 12 asked to stay true."""

from __future__ import annotations

import ast
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from torch import nn

import dropbp_fx
from dropbp_fx import discovery
from dropbp_fx.config import options_table
from dropbp_fx.pipeline import PIPELINE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _installed_name(path: pathlib.Path) -> str:
    """The name a file imports as: ``passes/data_flow.py`` -> ``dropbp_fx.passes.data_flow``,
    ``dropbp_fx/demo/__init__.py`` -> ``dropbp_fx.demo``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "passes":
        parts = ["dropbp_fx", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> "nx.DiGraph":
    """Module -> the project modules it imports (at the top or inside a function), by installed name."""
    import networkx as nx

    files = {_installed_name(p): p for p in [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]}
    g = nx.DiGraph()
    g.add_nodes_from(files)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                # ``from . import graph_view``: the submodule; ``from .data_flow import between``: the module
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            g.add_edges_from((name, t) for t in targets if t in files and t != name)
    return g


def test_no_import_circle_in_the_passes():
    """No module of the passes imports one that imports it back, directly or through others (runtime modules
    included), counting imports inside functions too."""
    import networkx as nx

    cycles = [c for c in nx.simple_cycles(import_graph()) if any(m.startswith("dropbp_fx.passes.") for m in c)]
    assert not cycles, cycles


def test_the_oracle_is_independent_of_the_code_under_test():
    """``dropbp_fx.testing`` judges the backend: it imports torch and the standard library, nothing of the project."""
    path = ROOT / "dropbp_fx" / "testing.py"
    relative = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    outside = {n.split(".")[0] for n in _imports(path)} - {"__future__", "contextlib", "functools", "torch"}
    assert not relative and not outside, (relative, outside)


def test_benchmarks_and_tests_do_not_lean_on_each_other():
    """The benchmarks import no test module; the tests import the benchmarks only in the tests of them (a test_*.py),
    never in a helper module every test shares."""
    def imports_package(path, package):
        return any(n.split(".")[0] == package for n in _imports(path))

    leaning = [p.name for p in (ROOT / "benchmarks").glob("*.py") if imports_package(p, "tests")]
    helpers = [p.name for p in (ROOT / "tests").glob("*.py")
               if not p.name.startswith("test_") and imports_package(p, "benchmarks")]
    assert not leaning and not helpers, (leaning, helpers)


def test_every_module_of_the_package_serves_the_product():
    """Each module of ``dropbp_fx`` is reached, through imports, from what a user runs or imports: the package,
    ``python -m dropbp_fx`` and ``python -m dropbp_fx.demo``, the oracle, the passes, the framework integrations
    (loaded by name). A module only the benchmarks or the tests import belongs with them."""
    import networkx as nx

    g = import_graph()
    roots = {"dropbp_fx", "dropbp_fx.__main__", "dropbp_fx.demo", "dropbp_fx.demo.__main__", "dropbp_fx.testing",
             "dropbp_fx.passes", *(m for m in g if m.split(".")[:2] == ["dropbp_fx", "integrations"])}
    reached = roots.union(*(nx.descendants(g, r) for r in roots))
    assert set(g) <= reached, sorted(set(g) - reached)


def test_passes_depend_on_nothing_in_the_runtime():
    offending = {p.name: sorted(n for n in _imports(p) if n.split(".")[0] in ("dropbp_fx", "passes"))
                 for p in (ROOT / "passes").glob("*.py")}
    assert not any(offending.values()), offending  # relative imports inside, factories passed in


def test_nothing_imports_the_repository_folder_as_a_top_level_package():
    files = [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    offending = [str(p.relative_to(ROOT)) for p in files if any(n.split(".")[0] == "passes" for n in _imports(p))]
    assert not offending, offending


def test_a_fresh_interpreter_imports_the_passes_first():
    code = "import sys, dropbp_fx.passes as p; assert 'passes' not in sys.modules; print(p.find_residual_branches)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "find_residual_branches" in out.stdout, out.stderr[-2000:]


def test_the_wheel_installs_nothing_at_top_level_but_the_project(tmp_path):
    for name in ("dropbp_fx", "passes"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".",
                          "-w", str(tmp_path / "dist")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl")))
    assert {n.split("/")[0] for n in wheel.namelist()} == {"dropbp_fx", "dropbp_fx-0.1.0.dist-info"}
    assert "dropbp_fx/passes/residuals.py" in wheel.namelist()
    assert {"dropbp_fx/demo/__main__.py", "dropbp_fx/demo/data.py", "dropbp_fx/testing.py"} <= set(wheel.namelist())
    assert not any("code_search" in n for n in wheel.namelist())  # a benchmark's task, not the product


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for p in [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]}
    assert all(n <= 420 for n in sizes.values()), {k: v for k, v in sizes.items() if v > 420}


def test_plots_leave_the_matplotlib_backend_alone():
    """Figures are drawn with ``matplotlib.figure.Figure`` and the Agg canvas: nothing sets the user's backend."""
    files = [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    pattern = re.compile(r"matplotlib\.use\(|import matplotlib\.pyplot|from matplotlib import pyplot")
    setting = [str(p.relative_to(ROOT)) for p in files
               if pattern.search(p.read_text()) and p.name not in ("test_plotting.py", "test_layout.py")]
    assert not setting, setting


def test_frame_walks_live_in_discovery_only():
    files = [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]
    walkers = sorted(str(p.relative_to(ROOT)) for p in files if "sys._getframe" in p.read_text())
    assert walkers == ["dropbp_fx/discovery.py"], walkers


def test_readme_option_table_is_the_config():
    readme = (ROOT / "README.md").read_text()
    assert options_table() in readme, "README's option table differs from dropbp_fx.config.options_table()"


def test_pipeline_prints_one_line_per_pass():
    lines = [str(p) for p in PIPELINE]
    assert [line.split(":")[0] for line in lines][:3] == ["checkpoints", "dead code", "find"]
    assert all(len(line.split(": ", 1)[1]) > 10 for line in lines)  # each with its one-line job


class _Layer(nn.Module):
    def __init__(self, breaks=False):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.breaks = breaks

    def forward(self, x):
        y = x + self.fc(x)
        if self.breaks:  # Dynamo then compiles this layer's frame on its own
            torch._dynamo.graph_break()
        return y


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(breaks=True) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def _function(x, w):
    return (x + x @ w).sum()


def test_frame_walks_find_what_they_look_for(monkeypatch):
    """The three facts :mod:`dropbp_fx.discovery` reads from the call stack, on this torch: this fails loudly
    when a torch release renames or restructures the frames (``OptimizedModule``, ``compile_wrapper``,
    ``_TorchCompileWrapper``)."""
    seen = []

    def backend(gm, example_inputs):
        seen.append((discovery.compiled_module(example_inputs), discovery.compiled_function(),
                     discovery.inside_ddp_optimizer()))
        return gm

    torch._dynamo.reset()
    model = _Net()
    torch.compile(model, backend=backend)(torch.randn(2, 8))
    assert all(root is model and not in_ddp for (root, _), _, in_ddp in seen)
    assert "layers.0" in {prefix for (_, prefix), _, _ in seen}  # the layer's own frame, named inside the model

    seen.clear()
    torch._dynamo.reset()
    torch.compile(_function, backend=backend)(torch.randn(2, 8), torch.randn(8, 8))
    assert seen and seen[0][1] is _function

    calls = []
    real = discovery.torch_compile_call
    monkeypatch.setattr(discovery, "torch_compile_call", lambda: calls.append(real()) or calls[-1])
    torch._dynamo.reset()
    torch.compile(_Net(), backend="dropbp", options={"inner": "eager"})(torch.randn(2, 8))
    assert calls and all(type(c).__name__ == "_TorchCompileWrapper" for c in calls)
    assert len({id(c) for c in calls}) == 1  # one call, one state
    torch._dynamo.reset()


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_dump_graphs_logs_each_rewritten_graph(inner, caplog):
    import logging

    torch._dynamo.reset()
    with caplog.at_level(logging.DEBUG, logger="dropbp_fx.graphs"):
        dbp = dropbp_fx.DropBP(inner=inner)
        torch.compile(nn.Sequential(_Layer(), _Layer()), backend=dbp)(torch.randn(2, 8)).sum().backward()
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "dropbp_fx.graphs")
    assert re.search(r"graph 0 after 'gate'", text) and "dropbp_gate_0" in text
    if inner != "eager":
        assert "piece for aot_eager" in text
    torch._dynamo.reset()
