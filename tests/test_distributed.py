"""DropBP under torch.distributed, in real processes: 2 ranks, gloo, on localhost, CPU.

* DDP (``find_unused_parameters=True``, ``torch._dynamo.config.optimize_ddp = False``): every rank draws the
  same mask, and gradients and parameters after each step equal a single-process run over the global batch
  with the same seed (float64), for ``torch.compile(DDP(model))`` and ``DDP(torch.compile(model))``.
  ``calibrate`` on every rank, each on its own batch, gives every rank the rates of the mean sensitivities.
* What DDP cannot train with per-step masks (DDPOptimizer fragments, ``static_graph=True``,
  ``find_unused_parameters=False``) is refused with a message that names the fix.
* FSDP2 (``fully_shard``): same masks on all ranks; gradients and parameters equal the single-process run.
  ``set_reduce_scatter_unused_params`` stays False: with one mask on every rank, the same parameters go
  without gradient everywhere, FSDP2 leaves them out of the reduce-scatter on every rank and their sharded
  ``.grad`` stays None, as in one process. True reduce-scatters zeros for them instead (``.grad`` = 0, which
  AdamW would still step with: momentum and weight decay move the parameters).

Workers are spawned with ``torch.multiprocessing``; an exception in a worker fails the test with the worker's
traceback, collectives time out, and workers still running at the deadline are killed.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import dropbp_fx
from dropbp_fx.controller import DropController
from dropbp_fx.testing import assert_same_grads, detached, grads
from tests.test_runtime import Block

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
DEADLINE_S = 240  # per spawn, all workers together; a healthy spawn takes 5-20 s on 2 cores
COLLECTIVE_TIMEOUT_S = 120
TOL = dict(rtol=1e-10, atol=1e-12)  # float64: only the order of the gradient sums differs


# --------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Success: leave without running C++ static destructors. Gloo's teardown at interpreter exit sometimes
    # aborts a worker that has finished its work ("terminate called without an active exception", SIGABRT:
    # 2 of 12 runs here); a failure above still propagates, with its traceback, through the exception.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` fresh processes; re-raise a worker's exception with its traceback."""
    context = mp.start_processes(_worker, args=(_free_port(), fn, args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    end = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException on failure
        if time.monotonic() > end:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"distributed workers still running after {deadline_s} s: killed")


def _same_on_all_ranks(value) -> None:
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, value)
    assert all(v == gathered[0] for v in gathered), f"ranks disagree: {gathered}"


# --------------------------------------------------------------------------- models and data
class Net(nn.Module):
    """Pre-norm residual MLP blocks and a trainable head."""

    def __init__(self, depth=4, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net(dtype=torch.float64, **kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs).to(dtype)


def _global_batch(step: int, d=16, size=8):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, d, generator=g, dtype=torch.float64), torch.randn(size, 1, generator=g,
                                                                                dtype=torch.float64)


def _shard(tensor, rank):
    size = tensor.shape[0] // WORLD
    return tensor[rank * size:(rank + 1) * size]


def _mse(out, y):
    return ((out - y) ** 2).mean()


OPTIONS = {"inner": "eager", "drop_rate": 0.5, "seed": 7}


def _reference(model):
    """The single-process run: a copy of the model on the full batch, same backend options (same seed).

    ``dynamic=False``: the copy shares its code with the model, compiled first at the per-rank batch size;
    without it Dynamo would compile the full batch with a symbolic batch size, another graph than the ranks'.
    """
    reference = copy.deepcopy(model)
    return reference, torch.compile(reference, backend="dropbp", options=OPTIONS, dynamic=False), \
        torch.optim.AdamW(reference.parameters(), lr=1e-2)


def _assert_same_params(actual: nn.Module, expected: nn.Module) -> None:
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- DDP equals one process
def _ddp_hand_written_net(rank, steps, calibrate_at):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dropbp_fx.calibrate import sensitivities

    torch._dynamo.config.optimize_ddp = False
    model = _net()
    reference, ref_compiled, ref_opt = _reference(model)
    compiled = torch.compile(DDP(model, find_unused_parameters=True), backend="dropbp", options=OPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dropped_any, masks = False, []
    for step in range(steps):
        x, y = _global_batch(step)
        if step == calibrate_at:  # on every rank, each on its own batch: the ranks must agree on the rates
            local = lambda: _mse(compiled(_shard(x, rank)), _shard(y, rank))  # noqa: E731
            measured, _ = sensitivities(compiled, local)
            table = dropbp_fx.calibrate(compiled, local, target=0.5)
            everyone = [None] * WORLD
            dist.all_gather_object(everyone, measured)
            for row in table:
                assert row.sensitivity == pytest.approx(sum(m[row.gate] for m in everyone) / WORLD, rel=1e-12)
            assert len(set(dbp.rates.values())) > 1
            _same_on_all_ranks(dbp.rates)
            dropbp_fx.get_dropbp(ref_compiled).set_rates(dbp.rates)
        _mse(compiled(_shard(x, rank)), _shard(y, rank)).backward()  # DDP averages: the mean of the global batch
        dbp = dropbp_fx.get_dropbp(compiled)
        mask = dbp.last_mask
        _same_on_all_ranks(mask)
        closed = [g for g, d in mask.items() if d]
        # an oracle independent of dropbp: the eager model with the closed branches' outputs detached
        with detached(reference, closed):
            loss = _mse(reference(x), y)
        params = dict(reference.named_parameters())
        oracle = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        _mse(ref_compiled(x), y).backward()
        assert dropbp_fx.get_dropbp(ref_compiled).last_mask == mask  # same seed, same names: same masks
        assert_same_grads(grads(model), grads(reference), **TOL)
        assert_same_grads(grads(model), oracle, **TOL)
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
        _assert_same_params(model, reference)
        dropped_any |= bool(closed)
        masks.append(mask)
    assert dbp.gate_names == [f"blocks.{i}.mlp" for i in range(4)]  # no "module." prefix from DDP
    assert dropped_any and len({tuple(m.values()) for m in masks}) > 1


def test_ddp_same_masks_grads_and_params_as_one_process():
    """Calibration included: every rank calibrates on its own batch, all get the rates of the mean sensitivity."""
    spawn(_ddp_hand_written_net, 6, 3)


def _ddp_llama(rank, steps):
    transformers = pytest.importorskip("transformers")
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.config.optimize_ddp = False
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, use_cache=False)).double().train()
    reference, ref_compiled, ref_opt = _reference(model)
    # the other order: DDP around the compiled model
    ddp = DDP(torch.compile(model, backend="dropbp", options=OPTIONS), find_unused_parameters=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(step))
        ddp(input_ids=_shard(ids, rank), labels=_shard(ids, rank)).loss.backward()  # equal token counts per rank
        mask = dropbp_fx.get_dropbp(ddp).last_mask
        _same_on_all_ranks(mask)
        ref_compiled(input_ids=ids, labels=ids).loss.backward()
        assert dropbp_fx.get_dropbp(ref_compiled).last_mask == mask
        assert_same_grads(grads(model), grads(reference), **TOL)
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
        _assert_same_params(model, reference)
    assert dropbp_fx.get_dropbp(ddp).gate_names == [f"model.layers.{i}.{b}" for i in range(2)
                                                    for b in ("self_attn", "mlp")]


def test_ddp_transformers_llama_matches_one_process():
    pytest.importorskip("transformers")
    spawn(_ddp_llama, 3)


# --------------------------------------------------------------------------- refused configurations
def _outcome(run) -> str:
    """'ok', or the message of what ``run`` raised."""
    try:
        run()
    except Exception as e:  # noqa: BLE001 - Dynamo wraps the backend's error in BackendCompilerFailed
        return f"{type(e).__name__}: {e}"
    return "ok"


def _ddp_configurations(rank, path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def step(compiled, d=16):
        x, y = _global_batch(0, d=d)
        _mse(compiled(_shard(x, rank).float()), _shard(y, rank).float()).backward()

    def train(ddp_kwargs, options=OPTIONS, d=16, steps=2, optimize_ddp=False):
        torch._dynamo.reset()
        torch._dynamo.config.optimize_ddp = optimize_ddp
        model = _net(torch.float32, d=d)
        compiled = torch.compile(DDP(model, **ddp_kwargs), backend="dropbp", options=options)
        for _ in range(steps):
            step(compiled, d)
        return compiled

    outcomes = {}
    # DDPOptimizer with more than one bucket: 4 blocks of 0.6 MB, 1 MB buckets
    outcomes["ddp_optimizer_buckets"] = _outcome(
        lambda: train(dict(find_unused_parameters=True, bucket_cap_mb=1), d=192, optimize_ddp=True))
    # DDPOptimizer with one bucket hands the backend the whole graph: nothing to refuse
    outcomes["ddp_optimizer_one_bucket"] = _outcome(lambda: train(dict(find_unused_parameters=True),
                                                                  optimize_ddp=True))
    outcomes["static_graph"] = _outcome(lambda: train(dict(static_graph=True)))
    outcomes["find_unused_false"] = _outcome(lambda: train(dict(find_unused_parameters=False)))

    def ddp_around_compiled():  # the other order: DDP(torch.compile(model))
        torch._dynamo.reset()
        ddp = DDP(torch.compile(_net(torch.float32), backend="dropbp", options=OPTIONS), find_unused_parameters=False)
        step(ddp)
    outcomes["find_unused_false_ddp_outside"] = _outcome(ddp_around_compiled)
    holder = {}
    outcomes["find_unused_false_rate_0"] = _outcome(
        lambda: holder.setdefault("c", train(dict(find_unused_parameters=False), {**OPTIONS, "drop_rate": 0.0})))
    if "c" in holder:
        outcomes["find_unused_false_then_rate"] = _outcome(lambda: dropbp_fx.get_dropbp(holder["c"]).set_rates(0.5))
        outcomes["find_unused_false_then_rate_0"] = _outcome(lambda: dropbp_fx.get_dropbp(holder["c"]).set_rates(0.0))
    _same_on_all_ranks(outcomes)
    if rank == 0:
        torch.save(outcomes, path)


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory):
    """Every configuration in one spawn (a spawn costs seconds): name -> 'ok' or the error message."""
    path = tmp_path_factory.mktemp("ddp") / "outcomes.pt"
    spawn(_ddp_configurations, str(path))
    return torch.load(path)


def test_ddp_optimizer_fragments_are_refused_with_the_fix(ddp_outcomes):
    message = ddp_outcomes["ddp_optimizer_buckets"]
    assert "DDPOptimizer" in message and "torch._dynamo.config.optimize_ddp = False" in message, message
    assert ddp_outcomes["ddp_optimizer_one_bucket"] == "ok"


def test_ddp_static_graph_is_refused_with_the_fix(ddp_outcomes):
    message = ddp_outcomes["static_graph"]
    assert "static_graph=True" in message and "find_unused_parameters=True" in message, message


def test_ddp_find_unused_parameters_false_is_refused_unless_nothing_drops(ddp_outcomes):
    message = ddp_outcomes["find_unused_false"]
    assert "find_unused_parameters=False" in message and "find_unused_parameters=True" in message, message
    assert ddp_outcomes["find_unused_false_ddp_outside"] == message
    assert ddp_outcomes["find_unused_false_rate_0"] == "ok"  # drop_rate=0 trains: no parameter goes unused
    assert ddp_outcomes["find_unused_false_then_rate"].startswith("RuntimeError: dropbp: DistributedDataParallel(")
    assert ddp_outcomes["find_unused_false_then_rate_0"] == "ok"


# --------------------------------------------------------------------------- FSDP2
def _fsdp2(rank, steps):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _net()
    reference = copy.deepcopy(model)  # eager, on the full batch, the drawn masks applied by the oracle's hooks
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # reduce_scatter_unused_params stays False: see the module docstring
    compiled = torch.compile(model, backend="dropbp", options=OPTIONS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    masks = []
    for step in range(steps):
        x, y = _global_batch(step)
        _mse(compiled(_shard(x, rank)), _shard(y, rank)).backward()
        mask = dropbp_fx.get_dropbp(compiled).last_mask
        _same_on_all_ranks(mask)
        with detached(reference, [g for g, d in mask.items() if d]):
            _mse(reference(x), y).backward()
        full = {n: None if p.grad is None else p.grad.full_tensor() for n, p in model.named_parameters()}
        assert_same_grads(full, grads(reference), **TOL)  # a dropped block's sharded grads stay None
        opt.step(), ref_opt.step()
        opt.zero_grad(set_to_none=True), ref_opt.zero_grad(set_to_none=True)
        for (name, p), (_, e) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.full_tensor(), e, **TOL, msg=lambda m: f"{name}: {m}")
        masks.append(mask)
    dbp = dropbp_fx.get_dropbp(compiled)
    assert dbp.gate_names == [f"blocks.{i}.mlp" for i in range(4)] and dbp.step == steps  # one mask per step
    # The masks of a single-process run with the same seed. FSDP2's hooks break the graph at every block, so
    # the first step meets its gates one at a time and draws its mask as they appear (topup over the gates
    # known so far); from the second step on, every gate is known and the masks are the same as in one process.
    single = DropController(OPTIONS["drop_rate"], seed=OPTIONS["seed"], keep_one_open=False)
    for name in dbp.gate_names:
        single.register(name)
    assert [list(m.values()) for m in masks[1:]] == [single.mask_for(step) for step in range(1, steps)]


def test_fsdp2_same_masks_grads_and_params_as_one_process():
    spawn(_fsdp2, 3)
