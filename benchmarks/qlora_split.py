"""Where a QLoRA step's time goes, per mask: forward, backward and optimizer step timed apart.

    python -m benchmarks.qlora_split            # the QLoRA model of benchmarks.run, inductor, 7 rounds

One compiled QLoRA model (Llama over an NF4 4-bit base, LoRA on every projection; ``benchmarks.common``) trains
with forced masks: every gate open, every other gate closed (two ways: the attention branches, the MLP
branches) and all but the last closed (the frozen trunk has no gradient of its own, so one gate stays open).
The masks take turns within each round (after two warm-up steps each); medians and ranges over the rounds.
The speed model says a closed branch saves its backward and nothing else: its prediction for each mask is the
open mask's forward and optimizer step plus the trunk's backward plus the open branches' backward, the
trunk's and the branches' backward read off the open and the all-but-one masks (``T(mask) = F + R +
B * open/n``, every branch counted alike: the attention and the MLP halves differ, their mean is the test). A
measured backward at the prediction means nothing of a dropped branch's backward (the 4-bit dequantisation of
its frozen weights included) still runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import time

import torch
from tqdm import tqdm

import dropbp_fx
from benchmarks.common import Sizes, build_model, make_batch

log = logging.getLogger("benchmarks.qlora_split")
OUT = os.path.join(os.path.dirname(__file__), "results", "qlora_split")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qlora_split", description=__doc__.split("\n\n")[0])
    p.add_argument("--inner", default="inductor", help="dropbp's inner compiler")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each mask once per round)")
    p.add_argument("--out", default=OUT, help="folder for qlora_split.json and qlora_split.md")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes, dev = Sizes(), torch.device("cpu")
    model = build_model(sizes, "qlora", 0, dev)
    dbp = dropbp_fx.DropBP(drop_rate=0.5, seed=0, inner=args.inner)
    compiled = torch.compile(model, backend=dbp)
    batch = make_batch(sizes, 0, dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(mask):
        with dbp.controller.forcing(mask):
            t0 = time.perf_counter()
            loss = compiled(input_ids=batch, labels=batch).loss
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    step({})  # the compile
    n = len(dbp.controller.names)
    masks = {"open": {i: False for i in range(n)}, "attention closed": {i: i % 2 == 0 for i in range(n)},
             "MLP closed": {i: i % 2 == 1 for i in range(n)}, "all but one closed": {i: i != n - 1 for i in range(n)}}
    for mask in masks.values():
        step(mask), step(mask)
    times = {k: [] for k in masks}
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for name, mask in masks.items():
            times[name].append(step(mask))
    med = {k: [statistics.median(t[i] for t in v) for i in range(3)] for k, v in times.items()}
    branches = (med["open"][1] - med["all but one closed"][1]) * n / (n - 1)  # B: every branch's backward
    trunk = med["open"][1] - branches  # R: the trunk's backward
    rows = []
    for name, mask in masks.items():
        open_share = sum(not d for d in mask.values()) / n
        f, b, o = med[name]
        predicted = med["open"][0] + trunk + branches * open_share + med["open"][2]
        rows.append({"mask": name, "open_gates": round(open_share * n), "forward_s": f, "backward_s": b,
                     "optimizer_s": o, "step_s": f + b + o, "predicted_step_s": predicted,
                     "predicted_backward_s": trunk + branches * open_share,
                     "backward_range_s": [min(t[1] for t in times[name]), max(t[1] for t in times[name])]})
    lines = ["| mask | open gates | forward s | backward s (range) | backward predicted | optimizer s | "
             "step s | step predicted |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mask']} | {r['open_gates']}/{n} | {r['forward_s']:.3f} | {r['backward_s']:.3f} "
              f"({r['backward_range_s'][0]:.3f}-{r['backward_range_s'][1]:.3f}) | {r['predicted_backward_s']:.3f} | "
              f"{r['optimizer_s']:.3f} | {r['step_s']:.3f} | {r['predicted_step_s']:.3f} |" for r in rows]
    table = "\n".join(lines)
    report = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "inner": args.inner,
              "rounds": args.rounds, "sizes": vars(sizes), "gates": n, "branches_backward_s": branches,
              "trunk_backward_s": trunk, "rows": rows, "markdown": table}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "qlora_split.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "qlora_split.md"), "w") as f:
        f.write(f"# QLoRA step split per mask ({report['date']}, torch {report['torch']}, inner {args.inner}, "
                f"{args.rounds} rounds, 1 thread)\n\n`python -m benchmarks.qlora_split`\n\n{table}\n")
    print(table)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main()
