"""`torch.compile(model, backend="dropbp")` in a fresh venv after `pip install .`, without importing dropbp_fx."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
        def forward(self, x):
            return x + self.fc(self.norm(x))

    model = nn.Sequential(Block(), Block(), nn.Linear(8, 2))
    assert "dropbp_fx" not in sys.modules  # the user never imports it: the entry point resolves the name
    compiled = torch.compile(model, backend="dropbp", options={"drop_rate": 0.5})
    compiled(torch.randn(4, 8)).sum().backward()
    import dropbp_fx
    state = dropbp_fx.get_dropbp(compiled)
    assert state.gate_names == ["0.fc", "1.fc"], state.gate_names
    assert sum(state.last_mask.values()) == 1, state.last_mask
    print("ok", dropbp_fx.__file__)
""")


@pytest.mark.skipif(os.environ.get("DROPBP_SKIP_VENV_TEST") == "1", reason="DROPBP_SKIP_VENV_TEST=1")
def test_backend_resolves_by_name_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + [str(ROOT)], check=True)
    out = subprocess.run([str(python), "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok ")
    installed = out.stdout.split()[1]
    assert str(venv) in installed  # the installed copy, not this checkout
