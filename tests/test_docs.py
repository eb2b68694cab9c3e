"""Every fenced ``python`` block of README.md and docs/*.md runs, so the front door cannot drift from the code.

The conventions (docs/contributing.md says them to writers):

* a block runs as written, alone: in a fresh namespace, with a fresh temporary directory as the working directory
  and Dynamo reset (no block sees another's names);
* a block that needs a model or data makes a small stand-in itself, under a ``# stand-in: ...`` comment, so that
  what runs is what the reader sees (transformers models from a config, never a hub name);
* a block that cannot run on CPU in CI is fenced ````python no-run`` and its first line is ``# not run: <reason>``;
  there are at most :data:`MAX_NO_RUN` such blocks, and each must still compile;
* shell (``bash``, ``sh``, ``console``) and output (plain ``````) blocks are not run.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_NO_RUN = 3
README_MAX_LINES = 220
MAIN_COMMAND = ('python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[demo]" && python -m dropbp_fx.demo')
TEST_COMMAND = ('python -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[test]" && python -m pytest -q')
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<info>[^`]*)$")
PYTHON_LIKE = {"py", "python3", "pycon", "ipython", "py3"}  # spellings that would dodge the test: not allowed


@dataclass(frozen=True)
class Block:
    path: Path
    index: int  # among the file's python blocks, from 0
    line: int  # of the opening fence, from 1
    info: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.index}"

    @property
    def no_run(self) -> bool:
        return "no-run" in self.info.split()[1:]


def fences(path: Path):
    """(line of the opening fence, info string, dedented body) of every fenced block of a markdown file."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start, body = m["indent"], i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        assert i < len(lines), f"{path.name}:{start + 1}: fence never closed"
        yield start + 1, m["info"].strip(), "\n".join(body) + "\n"
        i += 1


def python_blocks(path: Path) -> list[Block]:
    found = [(line, info, code) for line, info, code in fences(path) if info.split()[:1] == ["python"]]
    return [Block(path, i, line, info, code) for i, (line, info, code) in enumerate(found)]


BLOCKS = [b for path in DOCS for b in python_blocks(path)]


def _params():
    for b in BLOCKS:
        marks = [pytest.mark.skip(reason=f"{b.code.splitlines()[0]} (line {b.line})")] if b.no_run else []
        yield pytest.param(b, id=b.id, marks=marks)


@pytest.fixture
def _isolated(tmp_path, monkeypatch):
    """A fresh working directory; Dynamo's config, torch.distributed and accelerate's singletons as they were."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = torch._dynamo.config.save_config()
    modules = set(sys.modules)
    try:
        yield tmp_path
    finally:
        torch._dynamo.config.load_config(saved)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if "accelerate" in sys.modules:
            from accelerate.state import AcceleratorState, GradientState, PartialState

            AcceleratorState._reset_state(reset_partial_state=True)
            PartialState._reset_state()
            GradientState._reset_state()
        for name in set(sys.modules) - modules:  # modules a block wrote into its directory (e.g. a factory)
            if getattr(sys.modules[name], "__file__", None) and str(tmp_path) in sys.modules[name].__file__:
                del sys.modules[name]


@pytest.mark.parametrize("block", _params())
def test_python_block_runs(block: Block, _isolated):
    code = compile(block.code, f"{block.id} ({block.path.name} line {block.line + 1})", "exec")
    exec(code, {"__name__": "__main__", "__file__": str(_isolated / "snippet.py")})  # noqa: S102 - the docs' code


def test_there_are_python_blocks_in_the_readme_and_the_docs():
    assert sum(b.path.name == "README.md" for b in BLOCKS) >= 4
    assert len({b.path for b in BLOCKS}) >= 6, sorted({b.path.name for b in BLOCKS})


def test_no_run_blocks_are_few_and_each_says_why():
    no_run = [b for b in BLOCKS if b.no_run]
    assert len(no_run) <= MAX_NO_RUN, [b.id for b in no_run]
    for b in no_run:
        first = b.code.splitlines()[0]
        assert re.fullmatch(r"# not run: \S.{10,}", first), f"{b.id}: first line must be '# not run: <reason>'"
        compile(b.code, b.id, "exec")  # it still parses


def test_no_python_block_dodges_the_test():
    for path in DOCS:
        for line, info, _ in fences(path):
            lang = info.split()[:1]
            assert not (lang and lang[0].lower() in PYTHON_LIKE), f"{path.name}:{line}: fence ```{info}: use ```python"
            assert info.split()[1:] in ([], ["no-run"]) or lang != ["python"], f"{path.name}:{line}: ```{info}"


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)
    assert MAIN_COMMAND in lines and TEST_COMMAND in lines  # verbatim, each on its own line (.ci/run greps one)


def test_relative_links_resolve():
    link = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s#]+)(?:#[^)]*)?\)")
    broken = []
    for path in DOCS:
        for target in link.findall(path.read_text()):
            if not (path.parent / target).exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_every_doc_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Documentation", 1)[1].split("\n## ", 1)[0]
    missing = [p.name for p in DOCS[1:] if f"(docs/{p.name})" not in section]
    assert not missing, missing

