"""DropBP in a plain training loop under ``accelerate``: one process, and two launched with ``accelerate launch``
on CPU (gloo), the model compiled before or after ``accelerator.prepare``; masks equal across ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _read(out, world):
    return [json.load(open(os.path.join(out, f"rank{i}.json"))) for i in range(world)]


@pytest.mark.parametrize("order", ["after", "before"])
def test_one_process(tmp_path, order):
    out = subprocess.run([sys.executable, os.path.join(HERE, "accelerate_loop.py"), str(tmp_path), order],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = _read(tmp_path, 1)
    assert run["gates"] == [f"blocks.{i}.mlp" for i in range(3)] and run["step"] == 8
    assert any(any(m) for m in run["masks"]) and len(set(map(tuple, run["masks"]))) > 1


@pytest.mark.parametrize("order", ["after", "before"])
def test_two_processes_draw_the_same_masks(tmp_path, order):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert launcher, "the accelerate command is installed with the package"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --multi_gpu is accelerate's torchrun launcher; on a machine without GPUs Accelerator(cpu=True) joins with gloo
    # (--cpu alone starts one process: accelerate's multi-CPU launch needs mpirun)
    out = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
                          os.path.join(HERE, "accelerate_loop.py"), str(tmp_path), order],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = _read(tmp_path, 2)
    assert all(r["world"] == 2 and r["step"] == 8 for r in ranks)
    assert ranks[0]["gates"] == ranks[1]["gates"] == [f"blocks.{i}.mlp" for i in range(3)]
    assert ranks[0]["masks"] == ranks[1]["masks"] and any(any(m) for m in ranks[0]["masks"])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank saw its own shard of the data
