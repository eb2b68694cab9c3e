"""What every benchmark shares: the model, the candidates, masks, timers, memory probes, statistics.

Candidates (one model each, all built from the same seed, so they start from the same weights):

* ``eager``: the plain model;
* ``hand-detach``: the published library's approach, reimplemented here: every decoder layer's
  ``self_attn`` and ``mlp`` wrapped by hand in :class:`HandDrop`, which runs the branch with
  autograd on and returns ``output.detach()`` when the branch is dropped;
* ``dropbp-eager`` / ``dropbp-aot_eager`` / ``dropbp-inductor``: ``torch.compile(model,
  backend=dropbp_fx.DropBP(inner=...))``;
* ``inductor``: ``torch.compile(model)`` (inductor, no DropBP).

Masks: a gated candidate's step ``s`` at rate ``p`` drops exactly the branches that
``dropbp_fx.controller.draw_mask`` gives for ``(seed, s, gate name)``; the hand-wrapped model
draws with the backend's gate names, so every gated candidate sees the same masks in the same
(round, rate), and each step checks the mask it got against that expectation.

Rate 1 ("every branch detached", the speed model's T1) is not a valid DropBP rate (rates are
< 1): the backend gets ``1 - 1e-9`` for every gate and ``keep_one_open`` off for those steps
(otherwise LoRA would keep one branch open); the realised masks are checked to be all-dropped.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import os
import platform
import re
import statistics
import sys
import time
import weakref
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

import dropbp_fx
from dropbp_fx.controller import draw_mask, uniform
from dropbp_fx.demo.report import cpu_name

log = logging.getLogger("benchmarks")

CANDIDATES = ("eager", "hand-detach", "dropbp-eager", "dropbp-aot_eager", "dropbp-inductor", "inductor")
GATED = ("hand-detach", "dropbp-eager", "dropbp-aot_eager", "dropbp-inductor")
RATES = (0.0, 0.5, 0.75, 0.875)
ALL_DROPPED = 1.0  # T1: every branch detached
ALMOST_ONE = 1.0 - 1e-9  # what the backend gets for rate 1 (its rates must be < 1)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = ("full", "lora")  # the default set; ``qlora`` on request (``--modes qlora``)
ALL_MODES = (*MODES, "qlora")
MODE_TITLES = {"full": "full fine-tuning", "lora": "LoRA r=8 (all projections)",
               "qlora": "QLoRA r=8 (all projections, NF4 4-bit base, bitsandbytes)"}


@dataclass(frozen=True)
class Sizes:
    hidden: int = 512
    intermediate: int = 1376
    layers: int = 8
    heads: int = 8
    vocab: int = 8000
    seq: int = 256
    batch: int = 4

    def describe(self) -> str:
        return (f"LLaMA-style, hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, "
                f"{self.heads} heads, vocab {self.vocab}, seq {self.seq}, batch {self.batch}")


FULL_SIZES = Sizes()
QUICK_SIZES = Sizes(hidden=64, intermediate=172, layers=2, heads=4, vocab=512, seq=64, batch=2)


def sizes_from(d: dict) -> Sizes:
    return Sizes(**d)


def sizes_dict(s: Sizes) -> dict:
    return asdict(s)


def with_seq(s: Sizes, seq: int, batch: int | None = None) -> Sizes:
    return replace(s, seq=seq, batch=s.batch if batch is None else batch)


# ---------------------------------------------------------------------- model
def build_model(sizes: Sizes, mode: str, seed: int, device: torch.device) -> nn.Module:
    """A LlamaForCausalLM from a config (random init, nothing downloaded); ``lora``: LoRA adapters on every
    projection; ``qlora``: the same over an NF4 4-bit base (saved to a temporary folder, loaded back through
    bitsandbytes, which runs 4-bit on CPU too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if mode not in ALL_MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {ALL_MODES}")
    config = LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         max_position_embeddings=max(16384, sizes.seq), use_cache=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if mode == "qlora":
        import tempfile

        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32)
            model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quant, device_map=str(device))
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))
    return model.to(device).train() if mode != "qlora" else model.train()


def make_batch(sizes: Sizes, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq), generator=g).to(device)


_BRANCH = re.compile(r"layers\.(\d+)\.(self_attn|mlp)$")


def canonical(name: str) -> str | None:
    """``layers.3.mlp`` for any path ending that way (backend gate names of a PEFT model carry a long prefix)."""
    m = _BRANCH.search(name)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def expected_mask(names: list[str], rate: float, seed: int, step: int, keep_one_open: bool) -> dict[str, bool]:
    """The mask the backend draws at ``step`` (policy ``topup``), keyed by canonical branch name."""
    if rate >= ALL_DROPPED:
        return {canonical(n): True for n in names}
    mask = draw_mask([rate] * len(names), [uniform(seed, step, n) for n in names], "topup", keep_one_open)
    return {canonical(n): d for n, d in zip(names, mask)}


# ---------------------------------------------------------------------- hand-wrapped baseline
class HandMasks:
    """Per-step masks for the hand-wrapped model, drawn with the published top-up rule."""

    def __init__(self, paths: list[str], seed: int, keep_one_open: bool) -> None:
        self.paths = paths
        self.names = list(paths)  # the strings the uniforms are drawn for (set to the backend's gate names)
        self.seed = seed
        self.keep_one_open = keep_one_open
        self.rate = 0.0
        self.next_step = 0
        self.current: dict[str, bool] = {}
        self.forced: dict[str, bool] | None = None  # the next step's mask, set by hand

    def begin_step(self) -> None:
        if self.forced is not None:
            self.current, self.forced = self.forced, None
        else:
            self.current = expected_mask(self.names, self.rate, self.seed, self.next_step, self.keep_one_open)
        self.next_step += 1


class HandDrop(nn.Module):
    """The published layer's behaviour: the branch runs with autograd on; a dropped branch's output is detached."""

    def __init__(self, branch: nn.Module, key: str, masks: HandMasks) -> None:
        super().__init__()
        self.branch = branch
        self.key = key
        self.masks = masks

    def forward(self, *args, **kwargs):
        out = self.branch(*args, **kwargs)
        if self.training and torch.is_grad_enabled() and self.masks.current.get(self.key, False):
            if isinstance(out, tuple):
                return (out[0].detach(),) + tuple(out[1:])
            return out.detach()
        return out


def wrap_by_hand(model: nn.Module, seed: int) -> HandMasks:
    """Wrap every ``layers.i.self_attn`` and ``layers.i.mlp`` of ``model`` in :class:`HandDrop` (in place)."""
    targets = [(name, module) for name, module in model.named_modules() if canonical(name)]
    inside = {id(p) for _, module in targets for p in module.parameters()}
    trunk_trains = any(p.requires_grad and id(p) not in inside for p in model.parameters())
    masks = HandMasks([name for name, _ in targets], seed, keep_one_open=not trunk_trains)
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, HandDrop(module, canonical(name), masks))
    return masks


# ---------------------------------------------------------------------- candidates
class Candidate:
    """One model + optimizer; ``set_rate``/``set_step`` choose the next step's mask, ``train_step`` runs it."""

    def __init__(self, name: str, model: nn.Module, fn, *, dbp=None, hand: HandMasks | None = None,
                 lr: float = 1e-5, seed: int = 0) -> None:
        self.name = name
        self.model = model
        self.fn = fn
        self.dbp = dbp
        self.hand = hand
        self.seed = seed
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.rate = 0.0
        self.expected: dict[str, bool] | None = None
        self.mask_mismatches = 0
        self.masks_checked = 0
        self.mask_names: list[str] | None = None  # uniforms are drawn for these strings

    @property
    def gated(self) -> bool:
        return self.dbp is not None or self.hand is not None

    @property
    def compiled(self) -> bool:
        return self.fn is not self.model

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        if self.hand is not None:
            self.hand.rate = rate
        elif self.dbp is not None and self.dbp.gate_names:
            if rate >= ALL_DROPPED:
                self.dbp.set_rates(ALMOST_ONE)
                self.dbp.controller.keep_one_open = False
            else:
                self.dbp.set_rates(rate)
                self.dbp.controller.keep_one_open = self.dbp.config["keep_one_open"]

    def set_step(self, step: int) -> None:
        """The next forward draws the mask of ``step``."""
        if self.hand is not None:
            self.hand.next_step = step
            self.expected = expected_mask(self.hand.names, self.rate, self.seed, step, self.hand.keep_one_open)
        elif self.dbp is not None and self.dbp.gate_names:
            self.dbp.load_state_dict({**self.dbp.state_dict(), "step": step})
            keep = self.dbp.controller.keeps_one_open()
            self.expected = expected_mask(self.dbp.gate_names, self.rate, self.seed, step, keep)

    def set_mask(self, dropped: set[str]) -> None:
        """Force the next forward's mask: the canonical names in ``dropped`` closed, every other branch open."""
        if self.hand is not None:
            self.hand.forced = {canonical(n): canonical(n) in dropped for n in self.hand.names}
        elif self.dbp is not None:
            self.dbp.set_rates({n: ALMOST_ONE if canonical(n) in dropped else 0.0 for n in self.dbp.gate_names})
            self.dbp.controller.keep_one_open = False
        self.expected = {canonical(n): canonical(n) in dropped for n in self.branch_names()}

    def branch_names(self) -> list[str]:
        if self.hand is not None:
            return self.hand.names
        return self.dbp.gate_names if self.dbp is not None else []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.hand is not None:
            self.hand.begin_step()
        loss = self.fn(input_ids=batch, labels=batch).loss
        self._check_mask()
        return loss

    def train_step(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.forward(batch)
        if loss.requires_grad:  # every branch dropped and nothing else trains (LoRA at rate 1): no backward
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def realised_mask(self) -> dict[str, bool] | None:
        if self.hand is not None:
            return dict(self.hand.current)
        if self.dbp is not None:
            return {canonical(n): d for n, d in self.dbp.last_mask.items()}
        return None

    def _check_mask(self) -> None:
        if self.expected is None:
            return
        got = self.realised_mask()
        self.masks_checked += 1
        if got != self.expected:
            self.mask_mismatches += 1
            log.warning("%s: mask differs from the expected one (rate %g): got %s, expected %s", self.name,
                        self.rate, got, self.expected)
        self.expected = None


def make_candidate(name: str, sizes: Sizes, mode: str, seed: int, device: torch.device, lr: float = 1e-5,
                   dynamic: bool | None = None) -> Candidate:
    model = build_model(sizes, mode, seed, device)
    if name == "eager":
        return Candidate(name, model, model, lr=lr, seed=seed)
    if name == "hand-detach":
        hand = wrap_by_hand(model, seed)
        return Candidate(name, model, model, hand=hand, lr=lr, seed=seed)
    if name == "inductor":
        return Candidate(name, model, torch.compile(model, dynamic=dynamic), lr=lr, seed=seed)
    if name.startswith("dropbp-"):
        dbp = dropbp_fx.DropBP(drop_rate=0.0, inner=name[len("dropbp-"):], seed=seed, policy="topup")
        return Candidate(name, model, torch.compile(model, backend=dbp, dynamic=dynamic), dbp=dbp, lr=lr, seed=seed)
    raise ValueError(f"unknown candidate {name!r}; choose from {CANDIDATES}")


def share_mask_names(candidates: list[Candidate]) -> None:
    """After the backend's first forward: the hand-wrapped model draws its uniforms for the backend's gate names."""
    reference = next((c.dbp.gate_names for c in candidates if c.dbp is not None and c.dbp.gate_names), None)
    for c in candidates:
        if c.dbp is not None:
            names = sorted(canonical(n) or n for n in c.dbp.gate_names)
            if None in map(canonical, c.dbp.gate_names):
                log.warning("%s: gates that are not attention/MLP branches: %s", c.name, c.dbp.gate_names)
            c.gate_summary = names
    if reference is None:
        return
    by_canonical = {canonical(n): n for n in reference}
    for c in candidates:
        if c.hand is not None:
            if set(by_canonical) != {canonical(p) for p in c.hand.paths}:
                log.warning("hand-wrapped branches %s differ from the backend's gates %s", c.hand.paths, reference)
                continue
            c.hand.names = [by_canonical[canonical(p)] for p in c.hand.paths]


# ---------------------------------------------------------------------- timing
class Timer:
    """Wall time of ``fn()``: ``time.perf_counter`` on CPU, CUDA events (and a synchronize) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0, result
        start = time.perf_counter()
        result = fn()
        return time.perf_counter() - start, result


def spread(values) -> dict:
    """Median, min, max (and n) of finite values; None entries are left out."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def rate_key(rate: float) -> str:
    return f"{rate:g}"


# ---------------------------------------------------------------------- memory
class SavedBytes:
    """Bytes held for backward at the end of a forward: ``saved_tensors_hooks`` sees every tensor autograd saves;
    a saved tensor counts while the graph that saved it is alive (a detached branch's graph is freed at once),
    each storage once, parameters and buffers excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.items: list[tuple] = []

    def _pack(self, tensor):
        # Hold a detached alias: a saved *output* held with its grad_fn would make a reference cycle
        # (tensor -> node -> saved box -> tensor) that keeps the graph alive after it is dropped.
        box = _Box(tensor.detach())
        storage = tensor.untyped_storage()
        self.items.append((weakref.ref(box), storage.data_ptr(), storage.nbytes()))
        return box

    @staticmethod
    def _unpack(box):
        return box.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def live(self) -> tuple[int, int]:
        """(activation bytes, bytes including saved parameters) still held."""
        storages = {ptr: n for ref, ptr, n in self.items if ref() is not None}
        return sum(n for p, n in storages.items() if p not in self.exclude), sum(storages.values())


class _Box:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class PeakMemory:
    """Peak memory of a step, as the rise over what the process held just before it.

    CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` (the caching allocator's bytes).
    CPU: the process's resident-set high-water mark (``VmHWM``), reset before each step by writing ``5`` to
    ``/proc/self/clear_refs``, after ``gc.collect()`` and glibc ``malloc_trim(0)``; the worker process runs
    with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors go back to the OS at once and the resident
    set follows live memory (both Linux-only; without them the method is reported as unavailable).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._libc = None
        if not self.cuda:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
        self.method = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats" if self.cuda else
                       "VmHWM (peak RSS) reset through /proc/self/clear_refs, after gc + malloc_trim; "
                       "MALLOC_MMAP_THRESHOLD_=65536")

    def available(self) -> bool:
        return self.cuda or (os.path.exists("/proc/self/clear_refs") and self._libc is not None)

    def reset(self) -> int:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


# ---------------------------------------------------------------------- the machine
def machine(device: torch.device) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "os": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
            "device": str(device)}
    try:
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    for package in ("transformers", "peft"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_machine(info: dict) -> str:
    where = info.get("gpu") or f"{info['cores']}-core CPU ({info['cpu']}, {info['torch_threads']} torch threads)"
    return (f"{where}, {info.get('ram_gib', '?')} GiB RAM; torch {info['torch']}, transformers {info['transformers']}, "
            f"peft {info['peft']}")

