"""``DropBP.plot(path)`` writes its PNG without touching the user's matplotlib: the backend and pyplot's figures stay
as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dropbp_fx

matplotlib = pytest.importorskip("matplotlib")
plt = pytest.importorskip("matplotlib.pyplot")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)


@pytest.fixture
def svg_backend():
    """A headless backend that is not Agg, for the test's length; the previous one back after."""
    before = matplotlib.get_backend()
    plt.switch_backend("svg")
    try:
        yield "svg"
    finally:
        plt.switch_backend(before)


def test_plot_leaves_the_backend_and_pyplot_alone(tmp_path, svg_backend):
    torch._dynamo.reset()
    dbp = dropbp_fx.DropBP(drop_rate=0.5, inner="eager")
    compiled = torch.compile(nn.Sequential(_Block(), _Block(), _Block()), backend=dbp)
    compiled(torch.randn(4, 8)).sum().backward()
    figures = plt.get_fignums()

    path = dbp.plot(str(tmp_path / "gates.png"))

    assert matplotlib.get_backend() == svg_backend
    assert plt.get_fignums() == figures  # no pyplot figure made, none left open
    png = (tmp_path / "gates.png").read_bytes()
    assert path == str(tmp_path / "gates.png") and png.startswith(PNG_SIGNATURE) and len(png) > 5_000
    torch._dynamo.reset()
