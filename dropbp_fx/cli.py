"""``python -m dropbp_fx explain MODEL``: what the backend would gate in a model, before a long run.

MODEL is a local model directory (``save_pretrained``), a transformers model type (built tiny from its
default config by :mod:`dropbp_fx.shrink`, random init), or ``module:factory`` (a function returning a model,
or ``(model, example_inputs)``). Prints :func:`dropbp_fx.explain`'s report (``--json`` for scripts) and exits
1 with the reason when nothing would be gated, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys

import torch
from torch import nn

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dropbp_fx", description="DropBP for any PyTorch model.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("explain", help="what the dropbp backend would gate in MODEL, and why the rest is not",
                       description=__doc__.split("\n\n")[0])
    e.add_argument("model", metavar="MODEL", help="a local model directory, a transformers model type (llama, gpt2, "
                                                  "bert, ...), or module:factory")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.add_argument("--seq", type=int, default=16, help="tokens per sequence of the example batch (default 16)")
    e.add_argument("--batch", type=int, default=2, help="sequences in the example batch (default 2)")
    e.add_argument("--drop-rate", type=float, default=0.5, help="the rate shown per gate (default 0.5)")
    return p.parse_args(argv)


def load(spec: str, seq: int, batch: int) -> tuple[nn.Module, dict, str]:
    """(model, example keyword inputs, description) for MODEL."""
    if os.path.isdir(spec):
        return _from_directory(spec, seq, batch)
    if ":" in spec:
        return _from_factory(spec, seq, batch)
    from dropbp_fx.models import batch_fn, build, mapping_of

    mapping = mapping_of(spec)
    if mapping is None:
        raise ValueError(f"{spec!r} is neither a directory, nor module:factory, nor a transformers model type with a "
                         "causal-LM, masked-LM, seq2seq or image-classification head")
    model, attn = build(spec, mapping)
    return model, batch_fn(model, mapping)(0), f"{type(model).__name__} (tiny, random init, {attn} attention)"


def _from_directory(path: str, seq: int, batch: int):
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    from transformers.models.auto import modeling_auto

    for names, auto in (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
                        ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
                        ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
                        (None, "AutoModel")):
        if names is None or config.model_type in getattr(modeling_auto, names):
            model = getattr(transformers, auto).from_pretrained(path).float().train()
            break
    vocab = getattr(config.get_text_config(), "vocab_size", None) or 1000
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if "labels" in _forward_params(model):
        inputs["labels"] = ids
    return model, inputs, f"{type(model).__name__} from {path}"


def _from_factory(spec: str, seq: int, batch: int):
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from error
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} returned {type(model).__name__}, not an nn.Module (or (model, example_inputs))")
    if inputs is None:
        raise ValueError(f"{spec} returned a model without example inputs; return (model, example_inputs), "
                         "example_inputs a dict of keyword arguments or a tuple of positional ones")
    return model, inputs, f"{type(model).__name__} from {spec}"


def _forward_params(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def explain_command(args) -> int:
    import dropbp_fx

    try:
        model, inputs, what = load(args.model, args.seq, args.batch)
    except ValueError as error:
        print(f"dropbp explain: {error}", file=sys.stderr)
        return 2
    options = {"drop_rate": args.drop_rate}
    if isinstance(inputs, dict):
        report = dropbp_fx.explain(model, options=options, **inputs)
    else:
        report = dropbp_fx.explain(model, *inputs, options=options)
    if args.json:
        print(json.dumps({"model": what, **dataclasses.asdict(report)}, indent=1))
    else:
        print(f"{what}\n{report}")
    if not report.gates:
        reasons = sorted({s.reason for s in report.skipped}) or ["no add in the graph"]
        print(f"dropbp explain: nothing in {args.model} would be gated, so DropBP cannot speed it up "
              f"({len(report.skipped)} adds looked at: {'; '.join(reasons[:3])})", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = parse_args(argv)
    return {"explain": explain_command}[args.command](args)
