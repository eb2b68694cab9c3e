"""Per-step drop masks for named gates.

A mask is a pure function of ``(seed, step, gate name, rates)``: every process that
uses the same seed draws the same masks, whatever else it does with its RNGs (the
global torch/python/numpy generators are never touched).

Step boundaries are found without help from the user: a training forward calls
each gate once, so the first gate that is called a second time starts a new step.
This holds across graph breaks (one controller serves every graph of a model) and
makes every training-mode forward draw a fresh mask; calls with grad disabled or
in eval mode draw nothing and drop nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import weakref
from collections import deque
import torch

from dropbp_fx._torch import in_backward
from dropbp_fx.config import POLICIES, DropBPConfig, check_rate  # noqa: F401 (re-exported)
from dropbp_fx.gate_spec import GateSpec, GateState  # noqa: F401 (GateState: re-exported)
from dropbp_fx.probe import ProbeRecorder
from dropbp_fx.schedules import Schedule


def uniform(seed: int, step: int, name: str) -> float:
    """A uniform number in [0, 1) determined by (seed, step, gate name) alone."""
    digest = hashlib.blake2b(f"{seed}:{step}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def draw_mask(rates: list[float], uniforms: list[float], policy: str, keep_one_open: bool,
              among: list[int] | None = None) -> list[bool]:
    """One step's mask from per-gate rates and uniforms.

    ``bernoulli``: gate i is dropped when ``u_i < rate_i``.
    ``topup`` (the published rule): after the Bernoulli draw, if fewer than
    ``floor(mean(rate) * n)`` gates are dropped, drop more, highest rate first
    (ties: smallest ``u`` first), until that count is reached.
    ``keep_one_open``: if every gate ended up dropped, reopen the one with the
    lowest rate (ties: largest ``u``), so that backward always has a path.
    ``among``: the gates that count for that (those holding trainable parameters); all by default.
    """
    n = len(rates)
    mask = [u < r for u, r in zip(uniforms, rates)]
    if policy == "topup" and n:
        target = math.floor(sum(rates) + 1e-9)
        missing = target - sum(mask)
        if missing > 0:
            order = sorted((i for i in range(n) if not mask[i]), key=lambda i: (-rates[i], uniforms[i]))
            for i in order[:missing]:
                mask[i] = True
    among = list(range(n)) if not among else among
    if keep_one_open and n and all(mask[i] for i in among):
        mask[min(among, key=lambda i: (rates[i], -uniforms[i]))] = False
    return mask


class DropController:
    """Owns the gates of one model: their rates, the current mask, the step counter and counts."""

    def __init__(self, drop_rate: float = 0.5, *, seed: int = 0, policy: str = "topup",
                 keep_one_open: bool | str = "auto", history: int = 100_000, schedule: Schedule | None = None) -> None:
        self.drop_rate = drop_rate
        self.schedule = schedule or Schedule()  # the gates' rates, scaled per step
        self.seed = seed
        self.policy = policy
        self.keep_one_open = keep_one_open
        self.gates: list[GateState] = []
        self._slots: dict[str, int] = {}
        self.step = 0  # masks drawn so far; the current mask belongs to step ``step - 1``
        self._mask: list[bool] = []
        self._used: set[int] = set()
        self.gate_params: set[str] = set()  # names (in the watched model) of parameters the gates consume
        self._trunk: tuple[int, bool] | None = None  # (len(gate_params), does a parameter outside them train?)
        self._trainable: tuple[tuple[int, int], list[int]] | None = None  # (cache key, trainable gate slots)
        self.trunk_inputs_train = False  # set for graphs of compiled functions: a grad input feeds the trunk
        self.history: deque[tuple[int, int]] = deque(maxlen=history)  # (dropped, gates) per step
        self.step_times: deque[tuple[float, float]] = deque(maxlen=1000)  # (dropped backward FLOPs, seconds)
        self._step_start: float | None = None
        self._model = None  # weakref to the compiled model: its eval mode turns dropping off
        self._forced: dict[int, bool] | None = None  # a calibration's fixed mask (slot -> dropped): see forcing()
        self._resumed: tuple[int, set[str]] | None = None  # (step, gate names) of a state loaded before any graph
        self.recorder = ProbeRecorder()  # on only inside recording()

    @classmethod
    def from_config(cls, config: DropBPConfig) -> DropController:
        schedule = Schedule(config.schedule, config.total_steps, config.ramp, config.min_rate, config.max_rate)
        return cls(config.drop_rate, seed=config.seed, policy=config.policy, keep_one_open=config.keep_one_open,
                   schedule=schedule)

    @contextlib.contextmanager
    def forcing(self, dropped: dict[int, bool]):
        """Inside the block, gates follow ``dropped`` (slot -> closed; missing: open): no step is drawn and
        nothing is counted (a calibration pass)."""
        previous, self._forced = self._forced, dict(dropped)
        try:
            yield
        finally:
            self._forced = previous

    @contextlib.contextmanager
    def recording(self):
        """Inside the block, every gate adds its gradient norms to ``self.recorder`` (emptied first)."""
        self.recorder.reset()
        self.recorder.active = True
        try:
            yield self.recorder
        finally:
            self.recorder.active = False

    def watch(self, model) -> None:
        """Drop only while ``model.training`` (a Dynamo graph may not be specialised on the mode)."""
        self._model = weakref.ref(model)

    # ---------------------------------------------------------------- gates
    def register(self, spec: GateSpec | str) -> int:
        """The slot of the gate ``spec`` describes (a name alone: a gate known by its name only, as a loaded state
        declares it). Gates of recompiled graphs share the slot of their name; their specs add up
        (:meth:`GateState.update`). The backend registers each gate its pipeline built once, the first call of
        a layer that reuses another layer's graph registers that layer's gate (:mod:`dropbp_fx.naming`)."""
        name = spec if isinstance(spec, str) else spec.name
        slot = self._slots.get(name)
        if slot is None and self._resumed is not None and name not in self._resumed[1]:
            raise ValueError(_mismatch_message([name], []))
        if slot is None:
            slot = len(self.gates)
            self._slots[name] = slot
            self.gates.append(GateState(name, self.drop_rate))
        if not isinstance(spec, str):
            self.gate_params.update(spec.params)
            self.gates[slot].update(spec)
        return slot

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.gates]

    @property
    def rates(self) -> dict[str, float]:
        return {g.name: g.rate for g in self.gates}

    def set_rates(self, rates: dict[str, float] | list[float] | float) -> None:
        """Set one rate for all gates, a list in gate order, or a dict by gate name."""
        if isinstance(rates, (int, float)):
            rates = [float(rates)] * len(self.gates)
        if isinstance(rates, dict):
            unknown = sorted(set(rates) - set(self._slots))
            if unknown:
                raise ValueError(f"unknown gate names {unknown}; the gates are {self.names}")
            values = [(self._slots[k], v) for k, v in rates.items()]
        else:
            rates = list(rates)
            if len(rates) != len(self.gates):
                raise ValueError(f"got {len(rates)} rates for {len(self.gates)} gates {self.names}; "
                                 "pass one rate per gate, in this order, or a dict by gate name")
            values = list(enumerate(rates))
        for _, rate in values:
            check_rate("rate", rate)
        for slot, rate in values:
            self.gates[slot].rate = float(rate)
        self._mask = []  # redraw with the new rates at the next call

    # ---------------------------------------------------------------- masks
    def trunk_trains(self) -> bool:
        """Does a trainable parameter of the watched model lie outside every gated branch?

        False for LoRA-style fine-tuning (only adapters inside the branches train): a step that closes
        every gate would then leave the loss without a ``grad_fn``. Parameters count as inside a gate
        when a gate's branch consumes them (``gate_params``).
        """
        model = self._model() if self._model is not None else None
        if model is None or self.trunk_inputs_train:
            return self.trunk_inputs_train
        if self._trunk is None or self._trunk[0] != len(self.gate_params):
            owned = self.gate_params
            trains = any(p.requires_grad and n not in owned for n, p in model.named_parameters())
            self._trunk = (len(owned), trains)
        return self._trunk[1]

    def trainable_gates(self) -> list[int]:
        """Slots of the gates whose branch holds a parameter that requires grad (all, without a model)."""
        model = self._model() if self._model is not None else None
        if model is None:
            return list(range(len(self.gates)))
        key = (len(self.gate_params), len(self.gates))
        if self._trainable is None or self._trainable[0] != key:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            self._trainable = (key, [i for i, g in enumerate(self.gates) if g.params & trainable])
        return self._trainable[1]

    def keeps_one_open(self) -> bool:
        if self.keep_one_open == "auto":
            return not self.trunk_trains()
        return bool(self.keep_one_open)

    def rates_at(self, step: int) -> list[float]:
        """Each gate's rate at ``step``: its uniform or calibrated rate, scaled by the schedule."""
        return [self.schedule.rate(g.rate, step) for g in self.gates]

    def mask_for(self, step: int) -> list[bool]:
        """The mask of ``step`` (a pure function of seed, step, names, rates and schedule)."""
        rates = self.rates_at(step)
        uniforms = [uniform(self.seed, step, g.name) for g in self.gates]
        # LoRA on some projections only: a step must keep open one gate that trains, not just any gate
        return draw_mask(rates, uniforms, self.policy, self.keeps_one_open(), self.trainable_gates())

    def is_dropped(self, slot: int) -> bool:
        """Called by a gate on every training-mode call: is the gate closed this step?"""
        if not torch.is_grad_enabled():
            return False
        if self._forced is not None:  # a calibration pass: no step, no counts
            return self._forced.get(slot, False)
        if in_backward():  # backward recomputing a checkpointed region
            return slot < len(self._mask) and self._mask[slot]
        if self._model is not None:
            model = self._model()
            if model is not None and not model.training:
                return False
        if slot in self._used or not self._mask:
            self._new_step()
        elif slot >= len(self._mask):  # a graph compiled mid-step brought new gates
            self._mask = self._mask + self.mask_for(self.step - 1)[len(self._mask):]
        self._used.add(slot)
        gate = self.gates[slot]
        gate.calls += 1
        dropped = self._mask[slot]
        gate.drops += dropped
        return dropped

    def closed(self, slot: int) -> bool:
        """Is the gate closed in the mask of the step now running (a calibration's forced mask inside
        :meth:`forcing`)? Unlike :meth:`is_dropped` it draws and counts nothing (backward hooks ask it)."""
        if self._forced is not None:
            return self._forced.get(slot, False)
        return slot < len(self._mask) and self._mask[slot]

    def _new_step(self) -> None:
        if self._resumed is not None and self.step > self._resumed[0]:  # a whole step ran since the load
            never_ran = [g.name for g in self.gates if g.calls == 0]
            if never_ran:
                raise ValueError(_mismatch_message([], never_ran))
            self._resumed = None
        now = time.perf_counter()
        if self._step_start is not None and self._mask:  # the step that ends here: its dropped FLOPs and time
            dropped = sum(g.flops[1] for g, d in zip(self.gates, self._mask) if d and g.flops)
            self.step_times.append((float(dropped), now - self._step_start))
        self._step_start = now
        self._mask = self.mask_for(self.step)
        self.step += 1
        self._used = set()
        self.history.append((sum(self._mask), len(self._mask)))

    @property
    def last_mask(self) -> dict[str, bool]:
        """Gate name -> dropped, for the most recent step (empty before the first training call)."""
        return {g.name: d for g, d in zip(self.gates, self._mask)}

    def drop_fractions(self) -> list[float]:
        """Fraction of gates dropped, per step, over the recorded history."""
        return [d / n for d, n in self.history if n]

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything the masks depend on: seed, step, policy, keep_one_open, each gate's rate (calibrated
        rates included) and the schedule. Plain Python values, so ``torch.load(..., weights_only=True)`` reads it back."""
        return {"seed": self.seed, "step": self.step, "policy": self.policy, "drop_rate": self.drop_rate,
                "keep_one_open": self.keep_one_open, "rates": self.rates, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: the next training step draws the mask the saved run would have drawn.

        Loaded before any graph compiled (a fresh ``DropBP``), the state declares the gates; a compiled graph
        that brings another gate, or a first step in which a declared gate never runs, is a ``ValueError``.
        Loaded later, the state must name exactly the model's gates.
        """
        names = list(state["rates"])
        if self.gates and set(names) != set(self.names):
            raise ValueError(_mismatch_message(sorted(set(self.names) - set(names)),
                                               sorted(set(names) - set(self.names))))
        fresh = not self.gates
        self.seed = int(state["seed"])
        self.policy = state["policy"]
        self.drop_rate = float(state["drop_rate"])
        self.keep_one_open = state.get("keep_one_open", self.keep_one_open)
        if "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        for name, rate in state["rates"].items():
            self.gates[self.register(name)].rate = float(rate)
        self.step = int(state["step"])
        self._resumed = (self.step, set(names)) if fresh or self._resumed is not None else None
        self._mask = []
        self._used = set()


def _mismatch_message(model_only: list[str], state_only: list[str]) -> str:
    parts = [f"gates of the model the state does not name: {model_only}"] if model_only else []
    parts += [f"gates the state names that the model does not run: {state_only}"] if state_only else []
    return ("dropbp: this drop state was saved from another model (gate names are module paths, e.g. "
            "'model.layers.0.mlp'): " + "; ".join(parts) + ". Load it into the model it was saved from.")
