"""The convergence benchmark's two tasks (``benchmarks/convergence.py``): data as tensors, a model factory, an
evaluation; both on the pretrained all-MiniLM-L6-v2 and the running Python's standard library."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from benchmarks.calibration import dataset_info
from dropbp_fx import code_search
from dropbp_fx.data import docstring_dataset, evaluate, labels_of, load_minilm, split, tokenize


@dataclass
class Task:
    """A fine-tuning task: its data as tensors, a model factory and its evaluation."""
    name: str
    title: str
    description: str
    metrics: dict  # metric name -> higher is better; the primary metric first
    train: dict
    evals: dict
    new_model: object  # seed -> model
    evaluate: object  # model -> {metric: value}
    dataset: dict


def classify_task(path: str, tokenizer, sizes) -> Task:
    """Docstring -> module classification (the main command's task), new classifier head per seed."""
    data = docstring_dataset()
    labels = labels_of(data)
    train, evals = split(data, 0.25) if not sizes.n_eval else (data[sizes.n_eval:], data[:sizes.n_eval])
    train_t, eval_t = tokenize(tokenizer, train, labels, sizes.seq), tokenize(tokenizer, evals, labels, sizes.seq)

    def run_eval(model) -> dict:
        acc, loss = evaluate(model, eval_t)
        return {"eval_loss": loss, "eval_acc": acc}

    return Task("classify", "docstring -> module classification (MiniLM + new head)",
                f"{len(data)} docstrings of {len(labels)} standard-library modules, {len(train)} train / "
                f"{len(evals)} held out; metrics: held-out cross-entropy, accuracy.",
                {"eval_loss": False, "eval_acc": True}, train_t, eval_t,
                lambda seed: load_minilm(path, len(labels), seed), run_eval,
                dataset_info(data, train, evals, labels))


def search_task(path: str, tokenizer, sizes) -> Task:
    """Code-documentation search: (qualified name + signature, docstring) pairs, in-batch negatives."""
    pairs = code_search.search_dataset()
    evals, train = pairs[:sizes.n_eval], pairs[sizes.n_eval:]
    train_t = code_search.tokenize_pairs(tokenizer, train, sizes.seq)
    eval_t = code_search.tokenize_pairs(tokenizer, evals, sizes.seq)

    def run_eval(model) -> dict:
        recall, loss = code_search.evaluate_search(model, eval_t)
        return {"recall_at_1": recall, "eval_loss": loss}

    return Task("search", "code search: docstring -> qualified name + signature (MiniLM dual encoder)",
                f"{len(pairs)} (name + signature, docstring) pairs of the standard library, {len(train)} train / "
                f"{len(evals)} held out; in-batch negatives (batch {sizes.batch}); metrics: recall@1 of each "
                f"held-out docstring among all {len(evals)} held-out keys, their in-set cross-entropy.",
                {"recall_at_1": True, "eval_loss": False}, train_t, eval_t,
                lambda seed: code_search.load_dual_encoder(path), run_eval,
                {"n": len(pairs), "n_train": len(train), "n_eval": len(evals), "python": sys.version.split()[0]})


BUILDERS = {"classify": classify_task, "search": search_task}


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """Rows of each step's batch, (steps, batch): whole shuffled epochs one after the other, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:steps * batch].view(steps, batch)
