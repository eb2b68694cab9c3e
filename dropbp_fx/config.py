"""The options of DropBP, written once.

:class:`DropBPConfig` is the one definition of the option set: ``torch.compile(..., backend="dropbp",
options={...})``, ``DropBP(...)``, ``DropBPCallback(...)`` and the demo's flags all build one, and the
README's option table is :func:`options_table` (a test keeps the two equal). A new option is a field
here, with its help line and its check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

POLICIES = ("topup", "bernoulli")
OPTIMIZER_MODES = ("none", "zero", "lr_scale")
NAMED_INNER = ("eager", "aot_eager", "inductor")  # tested in CI; any other Dynamo backend name or callable works too


def check_rate(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be a number in [0, 1) (0 = never drop), got {value!r}")


def _check_seed(key, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an int, got {value!r}")


def _check_policy(key, value) -> None:
    if value not in POLICIES:
        raise ValueError(f"{key} must be one of {POLICIES}, got {value!r}")


def _check_keep_one_open(key, value) -> None:
    if value not in ("auto", True, False):
        raise ValueError(f"{key} must be 'auto', True or False, got {value!r}")


def _check_inner(key, value) -> None:
    """A Dynamo backend name (``torch.compiler.list_backends(exclude_tags=())``) or a compiler callable."""
    if callable(value):
        return
    if value == "dropbp":
        raise ValueError(f"{key} cannot be 'dropbp' itself; choose the compiler of the pieces, e.g. {NAMED_INNER}")
    import torch

    known = set(torch.compiler.list_backends(exclude_tags=())) | set(NAMED_INNER)
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"{key} must be one of {NAMED_INNER}, another Dynamo backend name "
                         f"(torch.compiler.list_backends(exclude_tags=())) or a callable (gm, example_inputs) -> "
                         f"callable; got {value!r}")


def _check_schedule(key, value) -> None:
    from dropbp_fx.schedules import check_schedule

    check_schedule(key, value)


def _check_total_steps(key, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{key} must be None or a positive int (the run's optimizer steps), got {value!r}")


def _check_fraction(key, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{key} must be a fraction of training in (0, 1], got {value!r}")


def _check_optimizer_mode(key, value) -> None:
    if value not in OPTIMIZER_MODES:
        raise ValueError(f"{key} must be one of {OPTIMIZER_MODES}, got {value!r}")


def _check_cap(key, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1.0:
        raise ValueError(f"{key} must be a number >= 1 (the largest learning-rate scale), got {value!r}")


def _check_bool(key, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be True or False, got {value!r}")


def _option(default, help: str, check: Callable, shown: str | None = None):
    return field(default=default, metadata={"help": help, "check": check, "shown": shown})


@dataclass(frozen=True)
class DropBPConfig:
    """Every option of the ``dropbp`` backend, checked when made (a ``ValueError`` names the option and the
    valid values)."""

    drop_rate: float = _option(0.5, "float in [0, 1): target average fraction of residual branches dropped per "
                                    "step", lambda k, v: check_rate(k, v))
    seed: int = _option(0, "int: masks are a function of (seed, step, gate); the same seed gives the same masks "
                           "everywhere", _check_seed)
    policy: str = _option("topup", "`'topup'` = the published rule (Bernoulli, then force drops up to the target "
                                   "count), `'bernoulli'` = independent coin flips", _check_policy)
    keep_one_open: bool | str = _option("auto", "`'auto'`, `True` or `False`: when a step's mask closes every "
                                                "gate, reopen one; `'auto'` does so only when nothing outside the "
                                                "gates trains (LoRA-style)", _check_keep_one_open)
    # inductor: the fastest inner compiler on CPU in benchmarks/results/results.md
    inner: str | Callable = _option("inductor", "`'eager'`, `'aot_eager'`, `'inductor'`, any other Dynamo backend "
                                                "name, or a compiler callable: what compiles the trunk segments and "
                                                "the branches", _check_inner,
                                    shown="`'inductor'` (the fastest on CPU, see Benchmarks)")
    recompute: bool = _option(False, "`True`: every kept branch stores no activations and runs its forward again in "
                                     "backward (per-gate activation checkpointing; the mask is the forward's)",
                              _check_bool)

    schedule: str | Callable = _option("constant", "`'constant'`, `'ramp_up'` (PLD-style), `'ramp_down'` (to 0 "
                                                   "over the last `ramp` of training), `'ramp_up_down'` or a "
                                                   "callable step -> rate multiplier", _check_schedule)
    total_steps: int | None = _option(None, "int: the run's optimizer steps, for the ramps (the callbacks set "
                                            "it from max_steps)", _check_total_steps)
    ramp: float = _option(0.2, "fraction of training each ramp takes", _check_fraction)
    min_rate: float = _option(0.0, "float: no scheduled gate rate below this (a gate whose rate is 0 stays "
                                   "open)", lambda k, v: check_rate(k, v))
    max_rate: float = _option(0.95, "float: no scheduled gate rate above this", lambda k, v: check_rate(k, v))
    optimizer_mode: str = _option("none", "how a dropped branch's parameters meet the optimizer attached with "
                                          "`attach_optimizer` (the callbacks attach theirs): `'none'` = no "
                                          "gradient (AdamW skips them), `'zero'` = a zero gradient, "
                                          "`'lr_scale'` = kept branches' updates scaled by 1/(1 - rate)",
                                  _check_optimizer_mode)
    lr_scale_cap: float = _option(4.0, "float >= 1: the largest `lr_scale` factor", _check_cap)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            f.metadata["check"](f"dropbp option {f.name}", getattr(self, f.name))

    @classmethod
    def from_options(cls, options: dict | None) -> DropBPConfig:
        """From an ``options={...}`` dict; an unknown key is a ``ValueError`` that lists the valid ones."""
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            valid = "\n".join(f"  {k}: {v}" for k, v in OPTIONS.items())
            raise ValueError(f"dropbp: unknown option(s) {unknown}. Valid options:\n{valid}")
        return cls(**options)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# What the callbacks do without options: the configuration the convergence benchmark measured best or tied on
# all three of its tasks (benchmarks/results/convergence.md, 5 seeds, 2026-12-07; docs/schedules.md):
# the automatic rate with per-branch learning-rate compensation. The backend alone cannot do either (no loss to
# calibrate with, no optimizer), so it keeps drop_rate=0.5 and optimizer_mode="none".
RECOMMENDED = {"drop_rate": "auto", "optimizer_mode": "lr_scale"}

OPTIONS = {f.name: f.metadata["help"].replace("`", "") for f in dataclasses.fields(DropBPConfig)}
DEFAULTS = DropBPConfig().as_dict()


def validate_options(options: dict | None) -> dict:
    """Defaults filled in; a ``ValueError`` naming the valid keys and ranges for anything else."""
    return DropBPConfig.from_options(options).as_dict()


def options_table() -> str:
    """The README's option table (markdown)."""
    rows = ["| option | values | default |", "| --- | --- | --- |"]
    for f in dataclasses.fields(DropBPConfig):
        default = f.metadata["shown"] or f"`{f.default!r}`"
        rows.append(f"| `{f.name}` | {f.metadata['help']} | {default} |")
    return "\n".join(rows)
