"""Issue 23: every private torch name the project uses lives in one module per package (``dropbp_fx/_torch.py``,
``passes/_torch.py``), each with a comment saying why; an upgrade of torch shows its breakage in those two files."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOMES = {ROOT / "dropbp_fx" / "_torch.py", ROOT / "passes" / "_torch.py"}
# the oracle imports nothing of the project (tests/test_layout.py): its one private name, torch.utils._pytree,
# stays there, and dropbp_fx/_torch.py lists it with its reason
ORACLE = ROOT / "dropbp_fx" / "testing.py"
ORACLE_PRIVATE = {"torch.utils._pytree.tree_unflatten"}
# private attributes of torch objects (not reachable as a ``torch._x`` path): the ones the project has used
PRIVATE_ATTRIBUTES = {"_orig_mod", "_compiled_call_impl", "_torchdynamo_orig_callable", "maybe_as_int", "item_memo",
                      "_base", "_qualified_op_name", "_get_active_ddp_module", "_current_graph_task_id"}
PRIVATE_STRINGS = PRIVATE_ATTRIBUTES | {"_TorchCompileWrapper"}  # also flagged as string constants


def _modules() -> list[pathlib.Path]:
    files = [*(ROOT / "dropbp_fx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]
    return sorted(p for p in files if p not in HOMES)


def _private(parts: list[str]) -> bool:
    """A dotted torch path with a private component. Operator names (``torch.ops.aten._to_copy``) are graph
    contents, not Python API: they are not counted."""
    if parts[:2] == ["torch", "ops"]:
        parts = parts[:3]
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts)


def private_uses(path: pathlib.Path) -> list[str]:
    """``path:line name`` for each private torch name the module uses (imports, attribute chains on names bound
    to torch modules, the listed private attributes, and ``getattr(x, "<private attribute>")``)."""
    tree = ast.parse(path.read_text())
    torch_names = {"torch": "torch"}  # local name -> the torch module it is bound to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "torch":
                    if _private(a.name.split(".")):
                        found.append((node.lineno, a.name))
                    torch_names[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "torch":
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if _private(full.split(".")):
                    found.append((node.lineno, full))
                torch_names[a.asname or a.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in PRIVATE_ATTRIBUTES:
                found.append((node.lineno, node.attr))
                continue
            chain, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in torch_names:
                parts = [*torch_names[inner.id].split("."), *reversed(chain)]
                if _private(parts):
                    found.append((node.lineno, ".".join(parts)))
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_STRINGS:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1 and \
                isinstance(node.args[0], ast.Name) and node.args[0].id in torch_names and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) and \
                _private([*torch_names[node.args[0].id].split("."), node.args[1].value]):
            found.append((node.lineno, f"{torch_names[node.args[0].id]}.{node.args[1].value}"))
    rel = path.relative_to(ROOT)
    # an attribute chain is visited at each of its prefixes: report the longest once per line
    lines: dict[int, str] = {}
    for line, name in found:
        if len(name) > len(lines.get(line, "")):
            lines[line] = name
    return [f"{rel}:{line} {name}" for line, name in sorted(lines.items())]


def test_private_torch_names_only_in_the_torch_modules():
    uses = [u for p in _modules() for u in private_uses(p)
            if not (p == ORACLE and u.split(" ", 1)[1] in ORACLE_PRIVATE)]
    assert not uses, "private torch names outside dropbp_fx/_torch.py and passes/_torch.py:\n" + "\n".join(uses)


def test_the_scan_sees_private_names():
    """The scan finds what the torch modules hold (else it would pass vacuously)."""
    assert all(private_uses(home) for home in HOMES)


@pytest.mark.parametrize("home", sorted(HOMES), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_private_name_has_its_reason(home):
    """Every top-level name of a ``_torch`` module (function, class, alias or private import) has a comment saying
    why it is needed (``# why: ...``) in the comment block above it or on its lines, naming the public replacement
    where one exists."""
    lines = home.read_text().splitlines()
    tree = ast.parse(home.read_text())
    missing = []
    for node in tree.body:
        private_import = isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            _private(n.split(".")) for n in [getattr(node, "module", None) or "",
                                              *(a.name for a in node.names)])
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)) or private_import:
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            above = start - 1  # the comment block right above (0-based index of the first comment line)
            while above > 0 and lines[above - 1].lstrip().startswith("#"):
                above -= 1
            nearby = lines[above:node.end_lineno]
            if not any("# why:" in line for line in nearby):
                name = ast.unparse(node.targets[0]) if isinstance(node, ast.Assign) else getattr(node, "name", "import")
                missing.append(f"{home.relative_to(ROOT)}:{node.lineno} {name}")
    assert not missing, "names without a '# why:' comment:\n" + "\n".join(missing)


def test_passes_torch_module_does_not_import_dropbp_fx():
    home = ROOT / "passes" / "_torch.py"
    for node in ast.walk(ast.parse(home.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith(("dropbp_fx", "passes"))
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith(("dropbp_fx", "passes")) for a in node.names)
