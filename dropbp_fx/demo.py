"""A small end-to-end fine-tuning run, with and without DropBP.

    python -m dropbp_fx.demo                      # defaults: about a minute on 2 CPU cores
    python -m dropbp_fx.demo --drop-rate 0.75 --steps 300 --hidden 256

A LlamaForCausalLM built from a config (random init, nothing downloaded) learns a
toy next-token task: each sequence counts modulo the vocabulary from a random start
with a random stride of 1-8 (``17, 20, 23, ...``), so every token after the second
follows from the two before it. Three copies of the same initial weights see the
same batches, trained with AdamW:

* ``eager baseline``: the plain model;
* ``dropbp p=0``: ``torch.compile(model, backend="dropbp", options={"drop_rate": 0})``,
  gates in place but never closed (what compiling alone costs or saves);
* ``dropbp p=<rate>``: the same with the requested drop rate.

The runs advance in lockstep (one step of each per batch, the order rotating) so
that a noisy machine slows them alike; step times are medians over the steps after
the warm-up (which holds the compile), speedups are medians of per-step ratios.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import time

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import dropbp_fx

log = logging.getLogger("dropbp_fx.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dropbp_fx.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="timed training steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (the compile happens here)")
    p.add_argument("--drop-rate", type=float, default=0.5, help="DropBP target drop rate, in (0, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inner", default="inductor", choices=["eager", "aot_eager", "inductor"],
                   help="dropbp's inner compiler")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or not 0 < args.drop_rate < 1:
        p.error("need --steps >= 1, --warmup >= 0 and 0 < --drop-rate < 1")
    return args


def build_model(args) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = 8 * math.ceil(args.hidden * 8 / 3 / 8)  # SwiGLU sizing: 128 -> 344
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                         max_position_embeddings=args.seq, use_cache=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def make_batches(args, n: int) -> torch.Tensor:
    """``n`` batches of arithmetic sequences modulo the vocabulary: shape (n, batch, seq)."""
    g = torch.Generator().manual_seed(args.seed)
    start = torch.randint(0, args.vocab, (n, args.batch, 1), generator=g)
    stride = torch.randint(1, 9, (n, args.batch, 1), generator=g)
    return (start + stride * torch.arange(args.seq)) % args.vocab


class Run:
    """One model and its optimizer; ``step(x)`` trains on one batch and records loss and time."""

    def __init__(self, model, lr: float) -> None:
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr)
        self.losses, self.times = [], []

    def step(self, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss.item())


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = build_model(args)
    batches = make_batches(args, args.warmup + args.steps)
    log.info("LlamaForCausalLM: %.2fM parameters, %d layers, hidden %d, seq %d, batch %d; %d threads",
             sum(p.numel() for p in model.parameters()) / 1e6, args.layers, args.hidden, args.seq, args.batch,
             torch.get_num_threads())

    runs = {"eager baseline": Run(copy.deepcopy(model), args.lr)}
    for rate in (0.0, args.drop_rate):
        options = {"drop_rate": rate, "seed": args.seed, "inner": args.inner}
        compiled = torch.compile(copy.deepcopy(model), backend="dropbp", options=options)
        runs[f"dropbp p={rate:g}"] = Run(compiled, args.lr)

    names = list(runs)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        bar = tqdm(batches, desc="training", unit="step", dynamic_ncols=True)
        for i, x in enumerate(bar):
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate who goes first
                runs[name].step(x)
            if i == 0:
                log.info("first step (includes the compile): %s",
                         ", ".join(f"{n} {r.times[0]:.2f} s" for n, r in runs.items()))
            bar.set_postfix({n.split()[-1]: f"{r.losses[-1]:.3f}" for n, r in runs.items()})

    base = runs["eager baseline"].times[args.warmup:]
    results = {}
    print("\n| run | median step (s) | speedup vs baseline | final loss (mean of last 10) |")
    print("| --- | --- | --- | --- |")
    for name, r in runs.items():
        times = r.times[args.warmup:]
        results[name] = {"losses": r.losses, "step_times": times, "median_step_s": statistics.median(times),
                         "speedup": statistics.median(b / t for b, t in zip(base, times)),
                         "final_loss": statistics.fmean(r.losses[-10:])}
        res = results[name]
        print(f"| {name} | {res['median_step_s']:.4f} | {res['speedup']:.2f}x | {res['final_loss']:.3f} |")

    state = dropbp_fx.get_dropbp(runs[names[-1]].model)
    print(f"\n{state.summary()}")
    return {"args": vars(args), "runs": results, "baseline": results[names[0]], "dropbp": results[names[-1]],
            "state": state, "control_state": dropbp_fx.get_dropbp(runs[names[1]].model)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
