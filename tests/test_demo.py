"""The demo (``python -m dropbp_fx.demo``) runs end to end at tiny sizes."""

import math

import pytest

pytest.importorskip("transformers")

from dropbp_fx import demo  # noqa: E402


def test_demo_runs_and_drops():
    result = demo.main(["--steps", "4", "--warmup", "1", "--layers", "2", "--hidden", "64", "--seq", "16",
                        "--batch", "2", "--vocab", "64", "--drop-rate", "0.5", "--inner", "eager"])
    runs = result["runs"]
    assert set(runs) == {"eager baseline", "dropbp p=0", "dropbp p=0.5"}
    for r in runs.values():
        assert len(r["losses"]) == 5 and all(math.isfinite(x) for x in r["losses"])
        assert len(r["step_times"]) == 4 and r["median_step_s"] > 0
    # Nothing dropped: the same training as eager, to float tolerance.
    assert runs["dropbp p=0"]["losses"] == pytest.approx(runs["eager baseline"]["losses"], rel=1e-4)

    state = result["state"]
    assert len(state.gate_names) == 4  # attention and MLP of each of the 2 layers
    drops = sum(d for d, _ in state.counts().values())
    calls = sum(c for _, c in state.counts().values())
    assert calls == 4 * 5 and drops > 0
    assert sum(d for d, _ in result["control_state"].counts().values()) == 0
