"""One generic rule that shrinks any transformers config to a tiny model (no per-model table).

``shrink(config)`` walks ``config.to_dict()`` (nested sub-configs included: ``text_config``, ``vision_config``,
``encoder``, ``decoder``, ...) and rewrites every integer or float whose *name* says what it is:

* layer counts (``num_hidden_layers``, ``n_layer``, ``decoder_layers``, ...) -> 2; other ``*_layers`` counts
  (dense prefix layers, KV-shared layers, MTP layers) -> at most 1; layer periods / intervals -> at most 2,
  layer offsets and start indices -> at most 1, end indices -> the last layer;
* per-layer lists (``layer_types``, ``block_types``, any list as long as the layer count) -> 2 entries, chosen
  to keep distinct kinds (the first layer and the first layer that differs from it); lists of layer indices
  (``moe_layers``, ``cross_attention_layers``) are remapped to those 2 layers;
* hidden sizes (``hidden_size``, ``d_model``, ``n_embd``, ``dim``, ...) -> 64; FFN sizes -> 128; heads -> 4,
  KV heads -> 4 / 2 / 1 (multi-head, grouped, multi-query kept as such); head dims -> 16 (rotary parts 8);
  low ranks -> 16; experts -> 4, top-k -> 2, expert groups -> 1;
* vocabularies -> 256, and every token id at or above it moved to a distinct id at the top of the new
  vocabulary (ids 0-2 kept); positions -> at most 128; attention windows and chunks -> at most 8;
* every dropout, layer drop, drop path and router jitter -> 0; image size -> 32, patch size -> 4.

The relations it keeps between values and the repairs it makes are in :mod:`dropbp_fx.shrink_rules`; per-layer
lists of layer indices (each layer's K/V source) are remapped to the kept layers. Where the rule's model does not
build or train one eager step, :func:`dropbp_fx.models.build` tries the gentler shrinks of
:mod:`dropbp_fx.shrink_gentle` (``shrink(config, keep=..., fill=..., least=..., wide=...)``); what none of them
builds raises the rule's own exception, and the catalogue lists the type as unbuildable with that message.
"""

from __future__ import annotations

import re

from dropbp_fx import shrink_gentle as gentle
from dropbp_fx import shrink_rules as rules
from dropbp_fx.shrink_gentle import GENTLER, describe  # noqa: F401 (re-exported)

LAYERS = 2
HIDDEN = 64
FFN = 128
HEADS = 4
HEAD_DIM = 16
VOCAB = 256
MAX_POSITIONS = 128
WINDOW = 8
EXPERTS = 4
TOP_K = 2
IMAGE = 32
PATCH = 4
RANK = 16

# name -> class; the first matching pattern wins (order matters: "kv heads" before "heads", ...)
_RULES: list[tuple[str, str]] = [
    (r"drop|jitter|noise", "zero"),
    (r"(^|_)(num_hidden_layers|n_layers?|num_layers|(en|de)coder_layers|num_(en|de)coder_layers)$", "layers"),
    (r"(period|interval|every|pattern|_step$|per_block$|per_stack$|per_attn_res_block$)", "period"),
    (r"(layer_offset|start_index|index_start|_start$|first_k_dense)", "offset"),
    (r"(end_index|index_end|_end$)", "end"),
    (r"_layers$", "few"),
    (r"^depths?$", "depth"),
    (r"(key_value_heads|kv_heads|kv_n_heads|num_query_groups|mamba_n_groups|mamba_ngroups|^n_groups$)", "kv_heads"),
    (r"(heads$|^n_head$|^num_heads$|heads_per)", "heads"),
    (r"(rope_head_dim$|^rotary_dim$)", "rope_dim"),
    (r"(head_dim$|head_size$|^d_kv$|^d_head$|dim_head$|head_dim$|^kv_channels$|headdim$|d_head$)", "head_dim"),
    (r"(rank$|lowrank$)", "rank"),
    (r"(^(num_local_experts|num_experts|n_routed_experts|moe_num_experts)$)", "experts"),
    (r"(experts_per_tok|experts_per_token|top_?k$|^top_k_experts$|topk$|^moe_k$)", "top_k"),
    (r"(^n_group$|^num_expert_group$|^topk_group$|shared_experts$)", "one"),
    (r"(intermediate_size|ffn_dim|^d_ff$|^dim_ff$|ffn_hidden_size|feed_forward_size|^n_inner$|^hidden_dim$|^d_inner$|"
     r"intermediate_size_mlp|expert_ffn)", "ffn"),
    (r"(^hidden_size$|^d_model$|^n_embd$|^dim$|^emb_dim$|^embed_dim$|^embedding_size$|^word_embed_proj_dim$|"
     r"^attention_hidden_size$|^lru_width$|_hidden_size$|^true_hidden_size$|^intra_bottleneck_size$|"
     r"embedding_size$|^embedding_dim$|^projection_dim$|^hidden_sizes$|^embed_dims?$)", "hidden"),
    (r"^(num_groups|norm_num_groups)$", "groups"),
    (r"(vocab_size|_vocab$)", "vocab"),
    (r"(token_id|token_index)$", "token"),
    (r"(max_position_embeddings|^n_positions$|^max_seq_len$|^n_ctx$|^context_length$|_positions$|^max_pos_emb$)",
     "positions"),
    (r"(sliding_window|attention_window|attention_chunk_size|^local_attention$|window_len$|keep_window_size)",
     "window"),
    (r"^image_size$", "image"),
    (r"^window_size$", "image_window"),
    (r"^patch_size$", "patch"),
]
_COMPILED = [(re.compile(p), c) for p, c in _RULES]
# recomputed by the config from what the rule changed (backbone stages: from the depths)
_DERIVED = {"out_features", "out_indices", "stage_names"}
_NO_TOUCH = {"num_labels", "num_channels", "type_vocab_size", "layer_norm_eps", "rms_norm_eps", "initializer_range"}


# classes whose None default the rule replaces: kv heads (None: as many as heads), top-k, head dim
_NONE_DEFAULTS = {"kv_heads": lambda ctx: ctx.get("heads_new"), "top_k": lambda ctx: TOP_K,
                  "head_dim": lambda ctx: HEAD_DIM if ctx.get("heads_new") else None,
                  "vocab": lambda ctx: VOCAB}


def classify(name: str) -> str | None:
    if name in _NO_TOUCH:
        return None
    for pattern, cls in _COMPILED:
        if pattern.search(name):
            return cls
    return None


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar(cls: str, v, ctx: dict):
    """The new value of one number of class ``cls`` (``v`` the old one)."""
    if cls == "zero":
        return 0.0 if isinstance(v, float) else v  # ints named "drop..." are sizes (drop_..._num): kept
    if v is None and cls in _NONE_DEFAULTS:  # left to the model, which some defaults then fail on
        return _NONE_DEFAULTS[cls](ctx)
    if not _int(v):
        return v
    if cls == "layers":
        return LAYERS if v > 0 else v
    if cls == "period":
        return min(v, LAYERS)
    if cls == "offset":
        return min(v, 1)
    if cls == "end":
        return LAYERS - 1
    if cls == "few":
        return min(v, 1)
    if cls == "depth":
        return LAYERS
    if cls == "kv_heads":
        heads = ctx.get("heads")
        if v <= 1:
            return v
        return HEADS if heads is not None and v >= heads else 2
    if cls == "heads":
        return HEADS if v > 0 else v
    if cls == "rope_dim":
        return min(v, HEAD_DIM // 2)
    if cls == "head_dim":
        return min(v, HEAD_DIM)
    if cls == "rank":
        return min(v, RANK)
    if cls == "experts":
        return min(v, EXPERTS)
    if cls == "top_k":
        return min(v, TOP_K)
    if cls == "one":
        return min(v, 1)
    if cls == "ffn":
        return FFN * ctx.get("wide", 1) if v > 0 else v
    if cls == "hidden":
        return HIDDEN * ctx.get("wide", 1) if v > 0 else v
    if cls == "groups":  # of a group norm: they divide the shrunk widths
        return min(v, HEADS)
    if cls == "vocab":
        return min(v, VOCAB)
    if cls == "token":
        return ctx["token_map"].setdefault(v, v if v < 3 else VOCAB - 1 - len([t for t in ctx["token_map"] if t >= 3]))
    if cls == "positions":
        return min(v, MAX_POSITIONS) if v > 0 else v
    if cls == "window":
        return min(v, WINDOW) if v > 0 else v
    if cls == "image":
        return IMAGE
    if cls == "image_window":  # windows of patches (Swin): the 32-pixel image has 8 x 8 patches
        return min(v, 2)
    if cls == "patch":
        return min(v, PATCH)
    return v


def _value(name: str, v, ctx: dict):
    cls = classify(name)
    if cls is None or cls in ctx.get("keep", ()):
        return v
    if cls in ctx.get("least", ()) and _int(v):
        return min(v, 0)
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        if cls == "image":
            return type(v)([IMAGE] * len(v))
        if cls == "depth":  # blocks per stage
            return type(v)([1] * len(v))
        return type(v)(_scalar(cls, x, ctx) for x in v)
    return _scalar(cls, v, ctx)


def _is_index_list(name: str, v, n: int) -> bool:
    return ("layer" in name or "ids" in name or "indices" in name) and isinstance(v, (list, tuple)) and v != [] \
        and all(_int(x) and 0 <= x < n for x in v) and list(v) == sorted(set(v)) and len(v) != n


def _is_source_list(name: str, v) -> bool:
    """A per-layer list of layer indices: each entry an earlier layer or the layer itself (``kv_source_layers``)."""
    return "layer" in name and all(_int(x) and 0 <= x <= i for i, x in enumerate(v)) and list(v) != list(range(len(v)))


def _is_layer_keyed(v, n: int) -> bool:
    return isinstance(v, dict) and bool(v) and all(str(key).isdigit() and int(key) < n for key in v) \
        and all(isinstance(x, dict) for x in v.values())


def _layer_keys(v: dict, n: int) -> list:
    """Layer index -> the key ``v`` uses for it (``"05"`` or ``5``), or None."""
    keys = {int(key): key for key in v}
    return [keys.get(i) for i in range(n)]


def _keep(per_layer: list[list], n: int, target: int = LAYERS) -> list[int]:
    """The layers kept: the first, then the one that adds the most kinds not seen yet (the earliest on ties);
    more than :data:`LAYERS` (layer parts kept summing): the first ``target``."""
    if target > LAYERS:
        return list(range(min(target, n)))
    kept = [0]
    seen = {(j, repr(lst[0])) for j, lst in enumerate(per_layer)}
    while len(kept) < min(LAYERS, n):
        gain = [(len({(j, repr(lst[i])) for j, lst in enumerate(per_layer)} - seen), -i) for i in range(n) if i not in kept]
        best = -max(gain)[1]
        kept.append(best)
        seen |= {(j, repr(lst[best])) for j, lst in enumerate(per_layer)}
    return sorted(kept)


def _shrink_dict(d: dict, ctx: dict) -> dict:
    n = next((d[k] for k in d if classify(k) == "layers" and _int(d[k]) and d[k] > 0), None)
    heads = next((d[k] for k in d if classify(k) == "heads" and _int(d[k])), None)
    local = {**ctx, "heads": heads, "heads_new": HEADS if heads else None}
    all_layers = {k for k, v in d.items() if n and isinstance(v, (list, tuple)) and list(v) == list(range(n))}
    per_layer = {k: v for k, v in d.items() if n and n > 1 and isinstance(v, (list, tuple)) and len(v) == n
                 and k not in all_layers and not isinstance(v[0], dict)}
    by_layer = {k: v for k, v in d.items() if n and _is_layer_keyed(v, n)}  # per_layer_config: {"05": {...}}
    virtual = [[repr(v.get(key)) for key in _layer_keys(v, n)] for v in by_layer.values()]
    target, parts = rules.layer_target(d, n, LAYERS, classify)
    kept = _keep(list(per_layer.values()) + virtual, n, target) if per_layer or virtual else list(range(target))
    if n and "layers" in ctx.get("keep", ()):  # the layer count as it was: every per-layer entry too
        target, parts, kept = n, {}, list(range(n))
    out = {}
    for k, v in d.items():
        if k.lstrip("_") in _DERIVED:
            continue
        if k in by_layer:
            keys = _layer_keys(v, n)
            width = max(len(str(key)) for key in v)
            out[k] = {(f"{j:0{width}d}" if isinstance(keys[i], str) else j): _shrink_dict(v[keys[i]], local)
                      for j, i in enumerate(kept) if keys[i] in v}
        elif isinstance(v, dict) and not k.startswith("_") and k not in ("id2label", "label2id"):
            out[k] = v if "rope" in k else _shrink_dict(v, local)  # rope dicts: after the head dims, below
        elif k in all_layers:
            out[k] = type(v)(range(target))
        elif k in per_layer and _is_source_list(k, v):  # each layer's source layer (whose K/V it reads): remapped
            out[k] = type(v)(kept.index(v[i]) if v[i] in kept else j for j, i in enumerate(kept))
        elif k in per_layer:
            kept_values = [v[i] for i in kept]
            cls = classify(k)
            out[k] = type(v)(kept_values if cls in (None, "layers", "few") else [_value(k, x, local) for x in kept_values])
        elif "type" in k and isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            out[k] = type(v)(dict.fromkeys(v))  # a repeated pattern of kinds: each kind once, so 2 layers see them
        elif n and _is_index_list(k, v, n):
            remapped = [j for j, i in enumerate(kept) if i in set(v)]
            out[k] = type(v)(remapped or [LAYERS - 1])
        else:
            out[k] = _value(k, v, local)
    for k in parts:
        out[k] = parts[k]
    for k in d:  # layer counts follow the parts; a count of all the layers (shared, dense, ...) stays all
        if (parts and classify(k) == "layers" or classify(k) == "few" and k not in parts) and n and d[k] == n:
            out[k] = target
        elif n and d[k] == n and isinstance(k, str) and k.endswith("_blocks") and _int(d[k]):  # blocks: the layers
            out[k] = target
    rules.keep_equal_head_dims(d, out, classify)
    overrides = [(d[k][key], new) for k in by_layer for key, new in zip([key for key in _layer_keys(d[k], n)
                 if key in d[k] and _layer_keys(d[k], n).index(key) in kept], out[k].values())]
    rules.keep_sums(d, out, classify, overrides)
    rules.keep_list_relations(d, out)
    rules.keep_multiples(d, out, classify)
    rules.keep_within_positions(d, out, classify)
    rules.fill_experts(out, EXPERTS)
    rules.ssm_width(out)
    for k, v in d.items():
        if isinstance(v, dict) and "rope" in k:
            out[k] = _shrink_rope(v, d, out)
    return out


def _head_dim(d: dict) -> int | None:
    hidden = next((d[k] for k in d if classify(k) == "hidden" and _int(d[k])), None)
    heads = next((d[k] for k in d if classify(k) == "heads" and _int(d[k]) and d[k] > 0), None)
    explicit = next((d[k] for k in ("head_dim", "qk_rope_head_dim") if _int(d.get(k))), None)
    return explicit or (hidden // heads if hidden and heads else None)


def _shrink_rope(rope: dict, old: dict, new: dict) -> dict:
    """RoPE parameters: trained lengths <= the new positions; per-frequency lists (longrope factors,
    mrope sections) rescaled from the old rotary half-dimension to the new one."""
    old_half, new_half = _head_dim(old), _head_dim(new)
    factor = rope.get("partial_rotary_factor", old.get("partial_rotary_factor", 1.0)) or 1.0
    old_half = int((old_half or 0) * factor) // 2
    new_half = int((new_half or 0) * factor) // 2
    out = {}
    for k, v in rope.items():
        if _int(v) and "position" in k:
            v = min(v, MAX_POSITIONS)
        elif isinstance(v, (list, tuple)) and v and old_half and new_half:
            if len(v) == old_half:  # one entry per rotary frequency
                v = type(v)(v[:new_half])
            elif all(_int(x) for x in v) and sum(v) == old_half:  # a split of the frequencies (mrope_section)
                scaled = [max(1, x * new_half // old_half) for x in v]
                scaled[-1] += new_half - sum(scaled)
                v = type(v)(scaled)
        out[k] = v
    return out


def shrink_dict(d: dict, keep=(), fill: bool = False, least=(), wide: int = 1) -> dict:
    """The rule on a config dict (``config.to_dict()``); a new dict. A gentler shrink (:data:`GENTLER`):
    ``keep``, classes of values left as they were; ``fill``, token ids and clipping bounds left ``None`` given
    values; ``least``, classes set to 0 (counts of special layers: none); ``wide``, hidden and FFN sizes that
    many times the rule's."""
    ctx = {"token_map": {}, "keep": frozenset(keep), "least": frozenset(least), "wide": wide}
    out = _shrink_dict(d, ctx)
    rules.keep_equal_sizes(d, out, rules.hidden_map(d, out, classify))
    if fill:
        gentle.fill_token_ids(out, classify, VOCAB - 1 - len([t for t in ctx["token_map"] if t >= 3]))
        gentle.fill_bounds(out)
    return out


def shrink(config, **gentler):
    """A new config of the same class, shrunk by the rule (the constructor validates it); ``gentler``: a
    gentler shrink (keyword arguments of :func:`shrink_dict`)."""
    original = config.to_dict()
    d = shrink_dict(original, **gentler)
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    d["dtype"] = "float32"
    return rules.construct(type(config), d, original, LAYERS)
