"""The demo (``python -m dropbp_fx.demo``) runs end to end at tiny sizes: the table, demo.json, demo.png."""

import json
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from dropbp_fx import demo  # noqa: E402
from dropbp_fx.demo import curves, data  # noqa: E402

TINY = ["--steps", "6", "--warmup", "1", "--batch-size", "4", "--seq", "16", "--inner", "eager"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_args():
    # the pretrained MiniLM when its package is installed, else a random-init BERT (same code path otherwise)
    return ["--model", "minilm"] if data.minilm_dir() else ["--model", "bert"]


def _run(tmp_path, *args):
    report = demo.main([*TINY, *args, "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "demo.json").read_text())
    for name in ("demo.png", "gates.png"):
        png = (tmp_path / name).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and png[12:16] == b"IHDR" and len(png) > 10_000, name
    return report, saved


def test_demo_drops_and_reports(tmp_path, model_args):
    report, saved = _run(tmp_path, *model_args, "--drop-rate", "0.5")  # the demo's defaults: sensitivity rates
    assert saved["baseline"] == "eager" and saved["dropbp"] == "dropbp+eager"
    rows = {row["run"]: row for row in saved["table"]}
    assert list(rows) == ["eager", "dropbp+eager"]
    for row in rows.values():
        for key in ("median_step_s", "speedup", "final_train_loss", "eval_acc", "eval_loss", "train_s"):
            assert math.isfinite(row[key]), key
        assert row["median_step_s"] > 0 and 0 <= row["eval_acc"] <= 1
    assert rows["eager"]["speedup"] == 1.0
    base_run, drop_run = saved["runs"]["eager"], saved["runs"]["dropbp+eager"]
    assert len(base_run["losses"]) == 7
    # the DropBP run trains on until its loss (mean of the last 10) reaches the baseline's final one, or the cap
    n = len(drop_run["losses"])
    assert 7 <= n <= 1 + 2 * 6
    target = sum(base_run["losses"][-10:]) / len(base_run["losses"][-10:])
    if n > 7:
        assert n == 13 or sum(drop_run["losses"][-10:]) / 10 <= target + 1e-9
        assert (drop_run["time_to_target_s"] is None) == (n == 13 and sum(drop_run["losses"][-10:]) / 10 > target)
    for run in saved["runs"].values():
        assert all(math.isfinite(x) for x in run["losses"])
        assert len(run["step_s"]) == len(run["losses"]) and len(run["clock_s"]) == len(run["losses"]) - 1
    # the forward is not changed by DropBP: the same weights, batch and dropout give the same first loss
    losses = [run["losses"] for run in saved["runs"].values()]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)

    # calibrated at 10% of 7 steps (step 1): per-gate rates that differ, averaging 0.5 by backward FLOPs
    gates = saved["gates"]
    assert len(gates) >= 8 and saved["calibration"] and len(saved["calibration"]) == len(gates)
    rates = [g["rate"] for g in gates]
    assert max(rates) - min(rates) > 0.1
    flops = [g["bwd_flops"] for g in gates]
    assert sum(r * f for r, f in zip(rates, flops)) / sum(flops) == pytest.approx(0.5, abs=1e-3)
    assert all(g["calls"] == n for g in gates) and sum(g["drops"] for g in gates) > 0
    assert 0.2 < saved["realised_drop_flops_weighted"] < 0.9
    assert saved["summary"].splitlines()[0].startswith("gate") and "dropped/calls" in saved["summary"]
    assert report["markdown"].startswith("| run | median step (s) | speedup vs eager |")
    assert saved["dataset"]["n_eval"] > 50 and saved["args"]["steps"] == 6
    # time to the baseline's final loss: the baseline reaches its own by its last step at the latest
    base, dropbp = saved["runs"]["eager"], saved["runs"]["dropbp+eager"]
    assert base["target_loss"] == dropbp["target_loss"] == rows["eager"]["final_train_loss"]
    assert 0 < base["time_to_target_s"] <= base["train_s"] and base["time_to_target_speedup"] == 1.0
    if dropbp["time_to_target_s"] is None:
        assert dropbp["time_to_target_speedup"] is None and "not reached" in report["markdown"]
    else:
        assert dropbp["time_to_target_speedup"] == pytest.approx(base["time_to_target_s"] / dropbp["time_to_target_s"])
    assert "time to eager's final loss" in report["markdown"]


def test_demo_runs_the_callbacks_default_configuration(tmp_path, model_args):
    """``--rates auto --optimizer-mode lr_scale``: the callbacks' default, the automatic target with lr_scale."""
    _, saved = _run(tmp_path, *model_args, "--rates", "auto", "--optimizer-mode", "lr_scale")
    assert saved["args"]["rates"] == "auto" and saved["args"]["optimizer_mode"] == "lr_scale"
    target = saved["calibrated_target"]
    assert 0.0 <= target <= 0.9
    gates = saved["gates"]
    flops = [g["bwd_flops"] for g in gates]
    assert sum(g["rate"] * f for g, f in zip(gates, flops)) / sum(flops) == pytest.approx(target, abs=1e-3)


def test_time_to_target_reads_the_smoothed_loss_on_the_clock():
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0]  # one warm-up step, then five on the clock
    clock = [1.0, 2.0, 3.0, 4.0, 5.0]
    smoothed = curves.smoothed(losses, 10, partial=True)  # running mean of up to 10
    assert smoothed[-1] == pytest.approx(16 / 6)
    assert curves.time_to_target(clock, losses, 3.0, False, 10, partial=True) == 4.0  # mean of the first 5 = 3.0
    assert curves.time_to_target(clock, losses, 0.5, False, 10, partial=True) is None
    assert curves.time_to_target(clock, losses, 3.0, False, 10) is None  # without partial: no mean before 10 steps
    with pytest.raises(ValueError):
        curves.time_to_target(clock, losses[:4], 3.0, False, 2)  # fewer values than clock readings


def test_demo_rate_zero_trains_like_the_baseline(tmp_path, model_args):
    _, saved = _run(tmp_path, *model_args, "--drop-rate", "0", "--steps", "3")
    base, dropbp = saved["runs"].values()
    assert dropbp["losses"] == pytest.approx(base["losses"], rel=1e-4)
    assert dropbp["eval_acc"] == base["eval_acc"]
    assert saved["calibration"] is None and sum(g["drops"] for g in saved["gates"]) == 0


def test_demo_random_init_llama(tmp_path):
    _, saved = _run(tmp_path, "--model", "llama", "--rates", "uniform", "--steps", "2")
    assert saved["model"].startswith("LlamaForSequenceClassification (random init")
    assert [g["name"] for g in saved["gates"]][:2] == ["model.layers.0.self_attn", "model.layers.0.mlp"]
    assert all(g["rate"] == 0.5 for g in saved["gates"])


def test_demo_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit, match="not a transformers model type|not 'minilm'"):
        demo.main(["--model", "no-such-model", "--out", str(tmp_path)])
