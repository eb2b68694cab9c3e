"""The convergence benchmark's three tasks (``benchmarks/convergence.py``): data as tensors, a model factory, an
evaluation; all on the pretrained all-MiniLM-L6-v2 and the running Python's standard library.

Texts fill the sequence length fine-tuners use (``sizes.seq``, 128 in the full run): a classification example
packs docstrings of one module up to ``seq`` tokens, the masked-LM task cuts the concatenated docstrings into
``seq``-token blocks (``group_texts`` as in transformers' run_mlm.py), code search truncates at ``seq``."""

from __future__ import annotations

import collections
import math
import random
import sys
from dataclasses import dataclass

import torch

from benchmarks import code_search
from benchmarks.calibration import dataset_info
from dropbp_fx.demo.data import docstring_dataset, evaluate, labels_of, load_minilm, split, tokenize


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


def _pack(tokenizer, docs: list[str], seq: int, n: int, rng: random.Random) -> str:
    """Docstrings of one module drawn without replacement (``rng``) and joined until about ``seq`` tokens."""
    order = rng.sample(range(len(docs)), len(docs))
    text, used = [], 0
    for i in order:
        text.append(docs[i])
        used += len(tokenizer(docs[i], add_special_tokens=False)["input_ids"])
        if used >= seq:
            break
    return "\n".join(text)


def packed_classify_task(path: str, tokenizer, sizes) -> Task:
    """Which module do these docstrings come from: docstrings of one module packed to ``seq`` tokens; train and
    held-out examples are packed from disjoint docstrings (the split of :func:`docstring_dataset`)."""
    data = docstring_dataset(cap=400)
    labels = labels_of(data)
    train, evals = split(data, 0.25)
    rng = random.Random(0)

    def packed(pairs, n_per_module):
        by_module = collections.defaultdict(list)
        for text, module in pairs:
            by_module[module].append(text)
        out = [(_pack(tokenizer, by_module[m], sizes.seq, n, rng), m) for m in labels for n in range(n_per_module)]
        rng.shuffle(out)
        return out

    train_p, eval_p = packed(train, 60), packed(evals, 12)
    train_t, eval_t = tokenize(tokenizer, train_p, labels, sizes.seq), tokenize(tokenizer, eval_p, labels, sizes.seq)

    def run_eval(model) -> dict:
        acc, loss = evaluate(model, eval_t)
        return {"eval_loss": loss, "eval_acc": acc}

    return Task("classify", "docstrings -> module classification (MiniLM + new head)",
                f"{len(data)} docstrings of {len(labels)} standard-library modules, split 3:1, packed per module "
                f"to {sizes.seq} tokens: {len(train_p)} train / {len(eval_p)} held-out examples; metrics: held-out "
                "cross-entropy, accuracy.", {"eval_loss": False, "eval_acc": True}, train_t, eval_t,
                lambda seed: load_minilm(path, len(labels), seed), run_eval,
                dataset_info(data, train, evals, labels))


def mlm_task(path: str, tokenizer, sizes) -> Task:
    """Masked-LM domain adaptation of the pretrained MiniLM on standard-library docstrings: blocks of ``seq``
    tokens, 15% masked once per example with a fixed seed (80% [MASK], 10% random, 10% kept); the last
    ``n_eval`` blocks held out; metric: held-out masked-token cross-entropy (log perplexity)."""
    from dropbp_fx.demo.data import quiet_transformers

    ids = []
    for module in sorted(set(MLM_MODULES)):
        for text in sorted({t for t, _ in docstring_dataset(modules=(module,), cap=10_000)}):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    body = sizes.seq - 2
    blocks = torch.tensor(ids[:len(ids) // body * body]).view(-1, body)
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(0))]
    cls, sep = torch.full((len(blocks), 1), tokenizer.cls_token_id), torch.full((len(blocks), 1), tokenizer.sep_token_id)
    input_ids = torch.cat([cls, blocks, sep], 1)
    g = torch.Generator().manual_seed(1)
    chosen = torch.rand(input_ids.shape, generator=g) < 0.15
    chosen[:, 0] = chosen[:, -1] = False
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    roll = torch.rand(input_ids.shape, generator=g)
    masked = input_ids.clone()
    masked[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    rand = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[rand] = torch.randint(len(tokenizer), (int(rand.sum()),), generator=g)
    tensors = {"input_ids": masked, "attention_mask": torch.ones_like(masked),
               "token_type_ids": torch.zeros_like(masked), "labels": labels}
    n_eval = sizes.n_eval or max(16, len(blocks) // 8)
    evals = {k: v[:n_eval] for k, v in tensors.items()}
    train = {k: v[n_eval:] for k, v in tensors.items()}

    def new_model(seed):
        torch.manual_seed(seed)
        return quiet_transformers().BertForMaskedLM.from_pretrained(path).train()

    def run_eval(model) -> dict:
        was = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, n_eval, 32):
                b = {k: v[i:i + 32] for k, v in evals.items()}
                n = int((b["labels"] != -100).sum())
                total += float(model(**b).loss) * n
                count += n
        model.train(was)
        return {"eval_loss": total / count}

    return Task("mlm", "masked-LM domain adaptation on standard-library docstrings (MiniLM + MLM head)",
                f"{len(ids)} tokens of docstrings of {len(set(MLM_MODULES))} standard-library modules in "
                f"{len(blocks)} blocks of {sizes.seq} tokens, {len(blocks) - n_eval} train / {n_eval} held out, "
                "15% of tokens masked once (fixed seed); metric: held-out masked-token cross-entropy (log "
                "perplexity).", {"eval_loss": False}, train, evals, new_model, run_eval,
                {"n_tokens": len(ids), "n_blocks": len(blocks), "n_eval": n_eval, "python": sys.version.split()[0]})


MLM_MODULES = ("os", "re", "collections", "itertools", "math", "datetime", "random", "pathlib", "statistics",
               "decimal", "json", "string", "functools", "typing", "argparse", "logging", "subprocess", "shutil",
               "textwrap", "inspect", "email", "csv", "socket", "threading", "asyncio", "unittest", "tarfile",
               "zipfile", "urllib.parse", "http.client")


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


BUILDERS = {"classify": packed_classify_task, "search": search_task, "mlm": mlm_task}


def batch_order(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """Rows of each step's batch, (steps, batch): whole shuffled epochs one after the other, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    epochs = math.ceil(steps * batch / n)
    return torch.cat([torch.randperm(n, generator=g) for _ in range(epochs)])[:steps * batch].view(steps, batch)
