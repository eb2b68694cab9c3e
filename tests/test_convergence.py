"""The convergence benchmark's arithmetic and data, on small inputs: time to target, quality at equal time,
the median over seeds, recall@1, the code-search pairs, the configuration names. No training, no timing."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import code_search
from benchmarks import convergence_report as rep


# ---------------------------------------------------------------------- time to target
def test_smoothed_is_a_trailing_mean_from_the_window_on():
    assert rep.smoothed([1.0, 2.0, 3.0, 4.0], 2) == [None, 1.5, 2.5, 3.5]
    assert rep.smoothed([5.0, 1.0], 1) == [5.0, 1.0]
    with pytest.raises(ValueError):
        rep.smoothed([1.0], 0)


def test_time_to_target_is_the_first_smoothed_crossing():
    clock = [0.0, 10.0, 20.0, 30.0, 40.0]
    loss = [2.0, 0.4, 1.2, 0.5, 0.5]  # one lucky evaluation at 10 s: smoothed (window 2) it is 1.2, 0.8, 0.85, 0.5
    assert rep.time_to_target(clock, loss, 0.5, False, window=2) == 40.0
    assert rep.time_to_target(clock, loss, 0.5, False, window=1) == 10.0
    assert rep.time_to_target(clock, loss, 0.1, False, window=2) is None
    acc = [0.1, 0.5, 0.7, 0.9]
    assert rep.time_to_target(clock[:4], acc, 0.6, True, window=2) == 20.0  # (0.5 + 0.7) / 2 = 0.6: reached
    assert rep.time_to_target(clock[:4], acc, 0.6, False, window=2) == 10.0  # lower is better: 0.3 <= 0.6


def test_the_baseline_reaches_its_own_target_at_the_latest_at_its_end():
    clock, values = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [0.9, 0.3, 0.3, 0.3, 0.4, 0.35]
    target = rep.target_of(values, 3)
    assert target == pytest.approx((0.3 + 0.4 + 0.35) / 3)
    assert rep.time_to_target(clock, values, target, False, 3) == 3.0  # before its end: 0.3 <= 0.35
    rising = [0.9, 0.5, 0.3, 0.35, 0.32]
    assert rep.time_to_target(clock[:5], rising, rep.target_of(rising, 3), False, 3) == 4.0
    with pytest.raises(ValueError):
        rep.target_of([0.5], 2)


def test_value_at_takes_the_last_evaluation_not_after_the_time():
    clock, values = [0.0, 10.0, 20.0], [3.0, 2.0, 1.0]
    assert rep.value_at(clock, values, 15.0, 1) == 2.0
    assert rep.value_at(clock, values, 20.0, 1) == 1.0
    assert rep.value_at(clock, values, 25.0, 2) == 1.5
    assert rep.value_at(clock, values, 5.0, 2) is None  # no smoothed value yet


def test_median_speedup_counts_missing_seeds_as_zero():
    assert rep.median_speedup([1.2, 1.6, 1.4]) == pytest.approx(1.4)
    assert rep.median_speedup([None, 1.6, 1.4]) == pytest.approx(1.4)
    assert rep.median_speedup([None, None, 1.4]) is None
    assert rep.median_speedup([1.0, 2.0]) == pytest.approx(1.5)
    assert rep.median_speedup([None, 2.0]) is None
    assert rep.median_speedup([]) is None


def _run(config: str, seed: int, clock: list[float], loss: list[float], step_s: float) -> dict:
    kind, rate = ("baseline", 0.0) if config == "baseline" else (config.split("_p")[0], float(config.split("_p")[1]))
    return {"config": config, "kind": kind, "rate": rate, "seed": seed, "steps": 10 * (len(clock) - 1),
            "compile_s": 1.0, "realised_drop": rate, "step_s": [step_s] * 4,
            "curve": {"clock_s": clock, "eval_loss": loss, "eval_acc": [1 - x for x in loss]}}


def test_summarise_task_keys_and_speedups():
    base = [0.0, 10.0, 20.0, 30.0]
    runs = [_run("baseline", 0, base, [2.0, 1.0, 0.6, 0.6], 1.0),
            _run("baseline", 1, base, [2.0, 1.0, 0.8, 0.8], 1.0),
            _run("sensitivity_p0.5", 0, [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0], [2.0, 1.0, 0.6, 0.6, 0.5, 0.5, 0.5],
                 0.5),
            _run("sensitivity_p0.5", 1, [0.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0], [2.0, 1.5, 1.2, 1.1, 1.0, 1.0, 0.9],
                 0.5)]
    s = rep.summarise_task(runs, {"eval_loss": False, "eval_acc": True}, window=2)
    assert list(s) == ["baseline", "sensitivity_p0.5"]
    assert s["baseline"]["time_to_target_speedup"] == 1.0 and s["baseline"]["reached"] == "2/2"
    d = s["sensitivity_p0.5"]
    seeds = d["by_metric"]["eval_loss"]["per_seed"]
    assert seeds[0]["target"] == pytest.approx(0.6) and seeds[0]["time_to_target_s"] == 15.0
    assert seeds[0]["speedup"] == pytest.approx(30.0 / 15.0)
    assert seeds[1]["time_to_target_s"] is None and seeds[1]["speedup"] is None
    assert d["time_to_target_speedup"] is None and d["reached"] == "1/2"  # the median of (0, 2) touches a miss
    assert seeds[0]["at_baseline_time"] == pytest.approx(0.5) and seeds[0]["better_at_baseline_time"]
    assert d["step_time_speedup"] == pytest.approx(2.0)
    md = rep.markdown({"meta": {"command": "x", "machine_text": "m", "date": "d", "setup": "s",
                                "tasks": {"classify": {"title": "t", "description": "d", "primary": "eval_loss",
                                                       "metrics": {"eval_loss": False, "eval_acc": True}}}},
                       "classify": s})
    assert "| sensitivity_p0.5 | not reached | 1/2 |" in md and "| baseline | 1.00x" in md


# ---------------------------------------------------------------------- recall@1 and the dual encoder
def test_recall_at_1():
    q = torch.eye(3)
    assert code_search.recall_at_1(q, torch.eye(3)) == 1.0
    assert code_search.recall_at_1(q, torch.eye(3)[[1, 0, 2]]) == pytest.approx(1 / 3)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # a tie with a wrong key is a miss
    assert code_search.recall_at_1(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), keys) == 0.0


class _Encoder(torch.nn.Module):
    """A stand-in for BertModel: embeddings of the ids, ``last_hidden_state`` like transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.emb(input_ids)})()


def test_dual_encoder_loss_and_evaluation():
    torch.manual_seed(0)
    model = code_search.DualEncoder(_Encoder())
    ids = torch.randint(1, 10, (5, 2, 3))
    mask = torch.ones_like(ids)
    mask[:, :, -1] = 0  # padding does not count in the mean
    loss = model(ids, mask)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    assert float(loss.detach()) <= math.log(5) + 20 * 2  # cross-entropy over 5 keys of scaled cosines
    same = ids.clone()
    same[:, 1] = same[:, 0]  # every key the same text as its query: its own key is the most similar
    recall, _ = code_search.evaluate_search(model, {"input_ids": same, "attention_mask": mask})
    assert recall == 1.0 and model.training
    changed = ids.clone()
    changed[:, :, -1] = 0  # a padded position does not change the embedding
    assert torch.allclose(model.embed(ids[:, 0], mask[:, 0]), model.embed(changed[:, 0], mask[:, 0]))


# ---------------------------------------------------------------------- the code-search pairs
def test_key_and_query():
    def f(a, b=2):
        """Add two numbers together, the second one defaulting to two."""

    assert code_search.key_and_query("m.f", f) == ("m.f(a, b=2)", "Add two numbers together, the second one "
                                                                  "defaulting to two.")

    class C:
        def g(self, x):
            """g(x) -> int

            Return the answer for x, computed with great care."""
    key, query = code_search.key_and_query("m.C.g", C.g)
    assert key == "m.C.g(x)" and query == "Return the answer for x, computed with great care."

    def short():
        """Too short."""
    assert code_search.key_and_query("m.short", short) is None
    assert code_search.key_and_query("m.none", lambda: None) is None


def test_unique_pairs_drops_shared_keys_and_docstrings():
    pairs = [("a()", "doc one"), ("b()", "doc two"), ("c()", "doc two"), ("d()", "doc four"), ("d()", "doc five")]
    assert code_search.unique_pairs(pairs) == [("a()", "doc one")]


def test_search_dataset_is_deterministic_and_unique():
    modules = ("json", "textwrap", "heapq", "no_such_module_here")
    a, b = code_search.search_dataset(modules), code_search.search_dataset(modules)
    assert a == b and len(a) >= 15
    keys, queries = [k for k, _ in a], [q for _, q in a]
    assert len(set(keys)) == len(keys) and len(set(queries)) == len(queries)
    assert all(k.split("(")[0].split(".")[0] in modules for k in keys)
    assert any(k.startswith("json.dumps(") for k in keys)
    assert all(len(q) >= code_search.MIN_DOC and "(" in k for k, q in a)


def test_tokenize_pairs_shapes():
    class Tok:
        def __call__(self, texts, padding, truncation, max_length, return_tensors):
            ids = torch.tensor([[len(t)] * max_length for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    t = code_search.tokenize_pairs(Tok(), [("key()", "a query"), ("k2()", "another query")], seq=6)
    assert t["input_ids"].shape == (2, 2, 6)
    assert t["input_ids"][0, 0, 0] == len("a query") and t["input_ids"][0, 1, 0] == len("key()")


# ---------------------------------------------------------------------- the command's small pieces
def test_parse_config_and_batch_order():
    pytest.importorskip("transformers")
    from benchmarks import convergence

    parse = convergence.parse_config
    assert (parse("baseline").kind, parse("baseline").rate) == ("baseline", 0.0)
    assert (parse("sensitivity_p0.5").kind, parse("sensitivity_p0.5").rate) == ("sensitivity", 0.5)
    assert (parse("uniform_p0.875").kind, parse("uniform_p0.875").rate, parse("uniform_p0.875").options) == \
        ("uniform", 0.875, ())
    combined = parse("sensitivity_p0.75+lr+down+recal")
    assert dict(combined.options) == {"optimizer_mode": "lr_scale", "schedule": "ramp_down"} and combined.recalibrate
    assert parse("auto+zero").kind == "auto" and dict(parse("auto+zero").options) == {"optimizer_mode": "zero"}
    assert parse("recommended").kind in ("sensitivity", "uniform", "auto")  # a name of NAMED
    for bad in ("sensitivity", "random_p0.5", "uniform_p1", "uniform_p0", "sensitivity_p0.5+fast"):
        with pytest.raises(ValueError):
            convergence.parse_config(bad)
    order = convergence.batch_order(10, 4, 5, seed=3)
    assert order.shape == (5, 4)
    flat = order.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole epochs
    assert torch.equal(order, convergence.batch_order(10, 4, 5, seed=3))
    args = convergence.parse_args(["--quick", "--steps", "5", "--configs", "uniform_p0.5,baseline"])
    assert args.configs == ["baseline", "uniform_p0.5"] and args.sizes["classify"].steps == 6  # a multiple of 2


def test_recommended_is_the_library_default():
    """The benchmark's ``recommended`` and the callbacks' default (dropbp_fx.config.RECOMMENDED) are one
    configuration: the automatic rate with lr_scale."""
    from benchmarks.convergence_configs import parse_config
    from dropbp_fx.config import RECOMMENDED

    spec = parse_config("recommended")
    assert spec.kind == "auto" and RECOMMENDED["drop_rate"] == "auto"
    assert dict(spec.options) == {"optimizer_mode": RECOMMENDED["optimizer_mode"]}
