"""Relations the shrinking rule of :mod:`dropbp_fx.shrink` keeps, and the repairs it makes when a config
still does not validate. All are rules on names and on relations between values, never on a model type:

* layer parts: counts (``n_input_layers``, ``n_recurrent_layers``, ...) that summed to the layer count keep
  summing to it (the layer count becomes their shrunk sum);
* sums of sizes: a head dim that equalled a rotary part plus a non-rotary one (``head_dim == qk_nope_head_dim +
  qk_rope_head_dim``, read through per-layer overrides too) stays their sum; a list of sizes that summed to the
  hidden size (factored embeddings) is rescaled to sum to the new one; a list whose product was the positions
  keeps multiplying to the new positions;
* contexts / chunks / windows that fitted in the positions keep fitting;
* completions of the built config: per-layer kinds left ``None`` are written out; a hybrid whose kinds lost
  every attention layer gets one (last layer); empty RoPE parameters get defaults (per layer kind); experts
  left ``None`` beside a MoE FFN size get a count; a ``default_X`` left ``None`` beside a list ``Xs`` takes its
  first entry;
* equal sizes: a size left untouched that equalled a hidden size before takes its new value (adapter dims,
  ``hidden_size_global``); a hidden size that was a multiple of the hidden size stays that multiple (a block
  reading the hidden states concatenated with the embeddings); state-space heads x head dim = expand x hidden;
  block counts equal to the layer count follow it;
* attributes a model reads from a sub-config that lacks them are lent by the parent config (or its RoPE
  parameters); those it reads from a parent that lacks them, by the sub-configs where they agree;
* validator messages: ``X must be V, got W`` and ``requires X=V`` set ``X`` to ``V``; ``X (a) must be a
  multiple of Y (b)`` sets ``Y`` to 1; ``missing required
  fields`` sets the missing ones small (dims 16, others 4).
"""

from __future__ import annotations

import math
import re

_ATTN_FREE = {"linear_attention", "conv", "mamba", "mlp", "moe", "dense", "sparse"}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def layer_target(d: dict, n: int | None, layers: int, classify) -> tuple[int, dict]:
    """The new layer count and the new layer parts: counts named ``*_layers`` whose sum was ``n``."""
    if not n:
        return layers, {}
    parts = {k: v for k, v in d.items() if _int(v) and v > 0 and k.endswith("_layers") and classify(k) == "few"}
    if len(parts) > 1 and sum(parts.values()) == n:
        new = {k: min(v, layers) for k, v in parts.items()}
        return sum(new.values()), new
    return layers, {}


def keep_equal_head_dims(old: dict, new: dict, classify) -> None:
    """Head dims that were equal stay equal (MLA: ``head_dim == qk_rope_head_dim``); ``qk_head_dim`` stays the sum."""
    dims = [k for k in old if classify(k) in ("head_dim", "rope_dim") and _int(old[k]) and _int(new[k])]
    for k in dims:
        same = [j for j in dims if old[j] == old[k]]
        low = min(new[j] for j in same)
        for j in same:
            new[j] = low
    if all(_int(new.get(k)) for k in ("qk_head_dim", "qk_nope_head_dim", "qk_rope_head_dim")):
        new["qk_head_dim"] = new["qk_nope_head_dim"] + new["qk_rope_head_dim"]


def ssm_width(d: dict) -> None:
    """State-space heads x head dim = expand x hidden (Mamba-2 style layers), and d_ssm their product."""
    for pre in ("", "mamba_"):
        heads = next((k for k in (f"{pre}n_heads", f"{pre}num_heads", f"n_{pre}heads") if _int(d.get(k))), None)
        dim = next((k for k in (f"{pre}d_head", f"{pre}head_dim", f"{pre}headdim") if _int(d.get(k))), None)
        expand, hidden = d.get(f"{pre}expand"), d.get("hidden_size")
        if heads and dim and _int(expand) and _int(hidden):
            d[heads] = max(1, expand * hidden // d[dim])
            if _int(d.get(f"{pre}d_ssm")):
                d[f"{pre}d_ssm"] = d[heads] * d[dim]


def keep_sums(old: dict, new: dict, classify, per_layer: list[tuple[dict, dict]]) -> None:
    """Head dims that were a sum of two others stay that sum (per-layer overrides read over the root)."""
    views = [({}, {})] + per_layer
    for o_over, n_over in views:
        o = {**old, **o_over}
        dims = [k for k in o if classify(k) in ("head_dim", "rope_dim") and _int(o[k])]
        nv = {k: n_over.get(k, new.get(k)) for k in dims}
        for a in dims:
            for b in dims:
                for c in dims:
                    if len({a, b, c}) == 3 and ("rope" in b) != ("rope" in c) and b.endswith(a) and c.endswith(a) \
                            and o[a] == o[b] + o[c] and all(_int(nv[x]) for x in (a, b, c)):
                        target = n_over if a in n_over else new
                        target[a] = nv[b] + nv[c]


def keep_multiples(old: dict, new: dict, classify) -> None:
    """Hidden sizes that were a multiple of the hidden size (a block that reads the hidden states concatenated
    with the embeddings: twice as wide) stay that multiple of the new one."""
    hidden = next((k for k in ("hidden_size", "d_model", "n_embd") if _int(old.get(k)) and _int(new.get(k))), None)
    if not hidden:
        return
    for k, v in old.items():
        if k != hidden and _int(v) and classify(k) == "hidden" and v != old[hidden] and v % old[hidden] == 0 \
                and _int(new.get(k)):
            new[k] = v // old[hidden] * new[hidden]


def keep_list_relations(old: dict, new: dict) -> None:
    """Lists of sizes that summed to the hidden size, or multiplied to the positions, keep doing so."""
    hidden = next((k for k in ("hidden_size", "d_model", "n_embd") if _int(old.get(k))), None)
    positions = next((k for k in ("max_position_embeddings", "n_positions") if _int(old.get(k))), None)
    for k, v in old.items():
        if not (isinstance(v, (list, tuple)) and len(v) > 1 and all(_int(x) and x > 0 for x in v)):
            continue
        if hidden and sum(v) == old[hidden] and _int(new.get(hidden)) and new[hidden] != old[hidden]:
            scaled = [max(1, x * new[hidden] // old[hidden]) for x in v]
            scaled[-1] += new[hidden] - sum(scaled)
            new[k] = type(v)(scaled)
        elif positions and math.prod(v) == old[positions] and _int(new.get(positions)):
            total, out = new[positions], []
            for i in range(len(v) - 1):  # powers of two: the first factors as equal as they go
                f = 2 ** (int(math.log2(total)) // (len(v) - i))
                out.append(f)
                total //= f
            new[k] = type(v)(out + [total])


def keep_within_positions(old: dict, new: dict, classify) -> None:
    """Contexts, chunks and windows the rule left as they were that fitted in the positions still do."""
    positions = [k for k in old if classify(k) == "positions" and _int(old[k]) and _int(new.get(k))]
    for k, v in old.items():
        if _int(v) and new.get(k) == v and re.search(r"(context|chunk|window)", k) and classify(k) is None:
            for p in positions:
                if v <= old[p] and new[k] > new[p]:
                    new[k] = new[p]


def complete(config, d: dict, layers: int) -> bool:
    """Fill in what the built config lacks for a model to be made of it; True if ``d`` changed."""
    changed = False
    n = getattr(config, "num_hidden_layers", None)
    kinds = getattr(config, "layer_types", "absent")
    if kinds is None and _int(n) and "layer_types" in d:
        d["layer_types"] = ["full_attention"] * n
        return True
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(kinds, (list, tuple)) and kinds and _int(heads) and heads > 0 and set(kinds) <= _ATTN_FREE \
            and any("linear" in str(x) or "mamba" in str(x) for x in kinds):
        index = next((k for k in d if re.search(r"(attn|attention).*layer.*(ind|idx|ids)", k) and not d[k]), None)
        if index:
            d[index] = [len(kinds) - 1]
        elif isinstance(d.get("layer_types"), list):
            d["layer_types"] = d["layer_types"][:-1] + ["full_attention"]
        changed = bool(index) or isinstance(d.get("layer_types"), list)
    if d.get("rope_parameters") == {} and isinstance(kinds, (list, tuple)) and kinds:
        d["rope_parameters"] = {k: {"rope_type": "default", "rope_theta": 10000.0} for k in dict.fromkeys(kinds)}
        changed = True
    for k, v in list(d.items()):
        if k.startswith("default_") and v is None and isinstance(d.get(k[8:] + "s"), (list, tuple)) and d[k[8:] + "s"]:
            d[k] = d[k[8:] + "s"][0]
            changed = True
    return changed


def fill_experts(d: dict, experts: int) -> None:
    """Experts left ``None`` beside a MoE FFN size (the model then sizes a tensor by ``None``): routed ones
    ``experts``, shared ones 1."""
    if any(_int(v) and "moe" in k and "intermediate" in k for k, v in d.items()):
        for k in ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"):
            if k in d and d[k] is None:
                d[k] = experts
        for k in ("n_shared_experts", "num_shared_experts"):
            if k in d and d[k] is None:
                d[k] = 1


def hidden_map(old: dict, new: dict, classify, out: dict | None = None) -> dict:
    """Old hidden size -> new, over the whole tree (sub-configs included)."""
    out = {} if out is None else out
    for k, v in old.items():
        if isinstance(v, dict) and isinstance(new.get(k), dict):
            hidden_map(v, new[k], classify, out)
        elif isinstance(k, str) and classify(k) == "hidden" and _int(v) and _int(new.get(k)) and new[k] != v:
            out.setdefault(v, new[k])
    return out


def keep_equal_sizes(old: dict, new: dict, sizes: dict) -> None:
    """Sizes (``*_dim``, ``*_size``) the rule left as they were but that equalled a hidden size: its new value."""
    for k, v in old.items():
        if isinstance(v, dict) and isinstance(new.get(k), dict) and not k.startswith("_"):
            keep_equal_sizes(v, new[k], sizes)
        elif isinstance(k, str) and _int(v) and v >= 256 and new.get(k) == v and v in sizes \
                and re.search(r"(dim|size)($|_)", k):
            new[k] = sizes[v]


def repair(exc: BaseException, d: dict, original: dict) -> bool:
    """Change ``d`` (nested) as the validator's message asks; True if it did."""
    text = " ".join(str(e) for e in _chain(exc))
    m = re.search(r"`?(\w+)`? must be (-?\d+|False|True|None), got", text)
    if m:
        word = m.group(2)
        return _set(d, m.group(1), {"False": False, "True": True, "None": None}[word] if word[0].isalpha() else int(word))
    m = re.search(r"`?\w+`? \(\d+\) must be a multiple of `?(\w+)`? \(\d+\)", text)
    if m:  # an offset the rule moved off its period's multiples: a period of 1 keeps every offset on one
        return _set(d, m.group(1), 1)
    m = re.search(r"requires `?(\w+)`?\s*=\s*(-?\d+)", text)
    if m:
        return _set(d, m.group(1), int(m.group(2)))
    m = re.search(r"missing required fields: \[([^\]]*)\]", text)
    if m:  # a group the defaults leave half unset: the rest of it set, small (dims 16, others 4)
        return any([_set(d, name, 16 if "dim" in name else 4, only_none=True)
                    for name in re.findall(r"'(\w+)'", m.group(1))])
    return False


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _set(d: dict, key: str, value, only_none: bool = False) -> bool:
    done = False
    for k, v in d.items():
        if k == key and v != value and (v is None or not only_none):
            d[k], done = value, True
        elif isinstance(v, dict) and not k.startswith("_"):
            done = _set(v, key, value) or done
    return done


def construct(cls, d: dict, original: dict, layers: int, tries: int = 8):
    """``cls.from_dict(d)``, repaired (:func:`repair`) and completed (:func:`complete`) until it stands."""
    for _ in range(tries):
        try:
            config = cls.from_dict(d)
        except Exception as exc:  # noqa: BLE001 (the validators raise several kinds)
            if not repair(exc, d, original):
                raise
            continue
        if not complete(config, d, layers):
            return config
    return cls.from_dict(d)


def default_config(model_type: str):
    """The type's default config; where its own class validators refuse the defaults, without them (the
    shrunk config is validated when it is built)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001
        cls = CONFIG_MAPPING[model_type]
        saved = {c: c.__dict__["__class_validators__"] for c in cls.__mro__ if "__class_validators__" in c.__dict__}
        subs = [s for s in (getattr(cls, "sub_configs", None) or {}).values() if isinstance(s, type)]
        for s in subs:
            saved.update({c: c.__dict__["__class_validators__"] for c in s.__mro__
                          if "__class_validators__" in c.__dict__})
        try:
            for c in saved:
                c.__class_validators__ = []
            return cls()
        finally:
            for c, v in saved.items():
                c.__class_validators__ = v


def lend_missing(config, exc: BaseException) -> bool:
    """``'XConfig' object has no attribute 'a'`` on a sub-config: ``a`` from the parent (or its RoPE
    parameters) set on it; on the parent: ``a`` from its sub-configs, where all that have it agree (BLT's
    layer count, read by the cache); True if it was."""
    m = re.search(r"'(\w+)' object has no attribute '(\w+)'", str(exc))
    if not (isinstance(exc, AttributeError) and m):
        return False
    subs = [sub for sub in vars(config).values() if hasattr(sub, "to_dict") and not isinstance(sub, type)]
    if type(config).__name__ == m.group(1):  # the parent lacks it: lent by its sub-configs, where they agree
        values = {repr(getattr(sub, m.group(2))): getattr(sub, m.group(2)) for sub in subs
                  if getattr(sub, m.group(2), None) is not None}
        if len(values) == 1:
            setattr(config, m.group(2), next(iter(values.values())))
            return True
        return False
    for sub in vars(config).values():
        if type(sub).__name__ == m.group(1) and hasattr(sub, "to_dict"):
            rope = getattr(config, "rope_parameters", None) or {}
            if m.group(2) in rope:
                setattr(sub, m.group(2), rope[m.group(2)])
                return True
            if m.group(2) in config.to_dict():
                setattr(sub, m.group(2), getattr(config, m.group(2)))
                return True
    return False
