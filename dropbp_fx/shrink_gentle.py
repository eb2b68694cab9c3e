"""Gentler shrinks: what :func:`dropbp_fx.models.build` tries, in order, where the rule's model
(:mod:`dropbp_fx.shrink`) does not build or does not train one eager step. Each is the rule with one
difference, named by a keyword of :func:`dropbp_fx.shrink.shrink_dict`, never by a model type:

* ``fill``: token ids left ``None`` given ids no batch draws (a model that compares its input with
  ``pad_token_id``), clipping bounds left ``None`` given one (a model that clamps by it unconditionally);
* ``keep``: one class of values left as it was in the original config: a patch size fixed by the strides of a
  convolutional stem, an image size the downsampling needs, per-stage depths a model indexes by stage, a
  head count a validator relates to the KV heads, ...;
* ``least``: counts of special layers (KV-shared, dense prefix) 0;
* ``wide``: hidden and FFN sizes 2 or 4 times the rule's (sizes a model rounds up to a multiple of 64);
* last, the widest: hidden sizes, FFN sizes or layer counts as they were, under the size caps of
  :func:`dropbp_fx.models.build`.
"""

from __future__ import annotations

import re

# in the order tried (keyword arguments of dropbp_fx.shrink.shrink_dict)
GENTLER: list[dict] = [
    {"fill": True}, *({"keep": c} for c in [
        ("patch",), ("image",), ("image_window",), ("depth",), ("window",), ("positions",), ("head_dim", "rope_dim"),
        ("heads", "kv_heads"), ("groups",), ("rank",), ("experts", "top_k", "one"), ("period", "offset", "end")]),
    {"least": ("few",)}, {"wide": 2}, {"wide": 4}, {"keep": ("few",)}, {"keep": ("hidden",)}, {"keep": ("ffn",)},
    {"keep": ("layers",)}]


def describe(keep=(), fill: bool = False, least=(), wide: int = 1) -> str:
    """What a gentler shrink does differently from the rule, in words."""
    parts = ([f"{'/'.join(keep)} values kept"] if keep else []) + (["None ids and bounds filled"] if fill else []) \
        + ([f"{'/'.join(least)} counts 0"] if least else []) + ([f"{wide}x hidden and FFN sizes"] if wide > 1 else [])
    return ", ".join(parts) or "the rule"


def fill_token_ids(d: dict, classify, top: int) -> None:
    """Token ids left ``None`` (nested too) given distinct ids no batch draws: the free ones of 0-2 first (a
    padding id also indexes the position table: low), then counting down from ``top``. A model that compares its
    input with ``pad_token_id`` needs one."""
    def walk(x):
        for k, v in x.items():
            if isinstance(v, dict) and not k.startswith("_"):
                yield from walk(v)
            elif isinstance(k, str) and k.endswith("_id") and classify(k) == "token":
                yield x, k, v
    found = list(walk(d))
    used = {v for _, _, v in found if _int(v)}
    free = iter([i for i in range(3) if i not in used] + [i for i in range(top, 2, -1) if i not in used])
    for x, k, v in found:
        if v is None:
            x[k] = next(free)


def fill_bounds(d: dict, bound: float = 8.0) -> None:
    """Clipping bounds left ``None`` (nested too) set to ``bound`` (a model that clamps by it unconditionally)."""
    for k, v in d.items():
        if isinstance(v, dict) and not k.startswith("_"):
            fill_bounds(v, bound)
        elif v is None and isinstance(k, str) and re.search(r"(^|_)clip", k):
            d[k] = bound


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
