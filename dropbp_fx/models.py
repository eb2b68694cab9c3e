"""Tiny transformers models of any type, for checks before a long run (``python -m dropbp_fx explain TYPE``) and
for the catalogue benchmark: built from the type's default config shrunk by one generic rule
(:mod:`dropbp_fx.shrink`), random init, with a batch maker. A model that does not build or train one eager step
gets the inputs it asks for (images, audio features, labels as long as its outputs) or a gentler shrink
(:mod:`dropbp_fx.shrink_gentle`); the model records which (``batch_inputs``, ``shrunk_by``)."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from dropbp_fx.shrink import GENTLER, VOCAB, describe, shrink
from dropbp_fx.shrink_rules import default_config, lend_missing

MAPPINGS = {  # flag -> (transformers mapping, Auto class)
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
}
SEQ = 16


def model_types(mapping: str) -> list[str]:
    from transformers.models.auto import modeling_auto

    return sorted(getattr(modeling_auto, MAPPINGS[mapping][0]))


def mapping_of(model_type: str) -> str | None:
    """The first mapping (in :data:`MAPPINGS` order) that has ``model_type``."""
    return next((m for m in MAPPINGS if model_type in model_types(m)), None)


def build(model_type: str, mapping: str):
    """The shrunk model (fp32, train mode, seed 0) and the attention implementation it got.

    The model must train one eager step on :func:`batch_fn`'s batch (on a copy). Where the rule's model does not
    build or train, the inputs the model asks for are tried (:func:`_inputs_asked`), then the gentler shrinks of
    :data:`dropbp_fx.shrink.GENTLER` in turn (at most :data:`MAX_PARAMS` parameters and :data:`MAX_STACK` layers
    in one stack); if none stands, the rule's own exception is raised."""
    from transformers.models.auto import modeling_auto

    original = default_config(model_type)
    name = getattr(modeling_auto, MAPPINGS[mapping][0])[model_type]
    first = None
    for gentler in [{}, *GENTLER]:
        try:
            model, attn = _build(original, mapping, name, gentler)
            asked = _train_one_step(model, mapping, try_inputs=not gentler)
        except ImportError:  # a library the model needs is missing: no shrink builds it
            raise
        except Exception as exc:  # noqa: BLE001 - the validators and the models raise several kinds
            first = first or exc
            continue
        if gentler:
            model.shrunk_by = describe(**gentler)
        if asked:
            model.batch_inputs = asked
        return model, attn
    raise first


MAX_PARAMS = 20_000_000  # a gentler shrink's model at most this big (the catalogue compiles and trains it on CPU)
MAX_STACK = 12  # and at most this many layers in one stack


def _check_size(model: nn.Module) -> None:
    params = sum(p.numel() for p in model.parameters())
    stack = max((len(m) for m in model.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))), default=0)
    if params > MAX_PARAMS or stack > MAX_STACK:
        raise RuntimeError(f"a gentler shrink builds {params / 1e6:.1f}M parameters, {stack} layers in a stack: "
                           "too big")


def _build(original, mapping: str, name, gentler: dict):
    """The model of ``shrink(original, **gentler)``; a gentler shrink's is first made on the meta device and
    refused over the size caps (:func:`_check_size`), so that a gentle shrink of a big model allocates nothing."""
    import transformers

    config = shrink(original, **gentler)
    if mapping == "causal-lm":
        config.is_decoder = True  # what a causal LM head is for (BERT-style and Reformer heads ask for it)
    if mapping == "seq2seq-lm":  # shifting the labels right needs both
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = config.pad_token_id
    cls = getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name)
    if not isinstance(config, cls.config_class):  # MusicgenForCausalLM takes the decoder part of MusicgenConfig
        config = next((v for v in vars(config).values() if isinstance(v, cls.config_class)), config)
    if gentler:
        with torch.device("meta"):
            _check_size(_make_any(cls, config)[0])
    model, attn = _make_any(cls, config)
    return model.float().train(), attn


def _make_any(cls, config):
    for attn in ("sdpa", "eager"):
        try:
            return _make(cls, config, attn), attn
        except (ValueError, NotImplementedError):  # no sdpa for this architecture: eager
            if attn == "eager":
                raise


def _train_one_step(model: nn.Module, mapping: str, try_inputs: bool) -> dict:
    """One eager forward and backward on a copy of ``model`` (the RNG left as it was); the inputs it needed
    beyond :func:`batch_fn`'s own ({} for none). Raises what the step raised."""
    with torch.random.fork_rng(devices=[]):
        try:
            for _ in range(4):
                try:
                    _step(copy.deepcopy(model), batch_fn(model, mapping, {}))
                    return {}
                except AttributeError as exc:  # what the forward reads from a config that lacks it: lent, again
                    if not lend_missing(model.config, exc):
                        raise
            _step(copy.deepcopy(model), batch_fn(model, mapping, {}))
            return {}
        except Exception as exc:  # noqa: BLE001
            if not try_inputs:
                raise
            for asked in _inputs_asked(model, mapping):
                try:
                    _step(copy.deepcopy(model), batch_fn(model, mapping, asked))
                    return asked
                except Exception:  # noqa: BLE001 - the next, or the step's own exception
                    pass
            raise exc


def _step(model: nn.Module, batches) -> None:
    loss = getattr(model(**batches(0)), "loss", None)
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(f"the model returned no loss ({type(model).__name__} ignores the labels)")
    if not torch.isfinite(loss):
        raise RuntimeError(f"eager loss is {loss.item()}")
    loss.backward()


def _inputs_asked(model: nn.Module, mapping: str):
    """Inputs a model may need beyond token ids and labels, each tried in turn: outputs as long as the model
    makes them (a decoder of fixed length: labels of that length), the images of an image-text model, audio
    features of a speech model (as many frames per token as its encoder needs), ``use_cache=False``."""
    if mapping == "image-classification":
        return
    params = _forward_params(model)
    try:
        with torch.no_grad():
            out = copy.deepcopy(model)(input_ids=batch_fn(model, mapping, {})(0)["input_ids"])  # a model may keep state
        length = getattr(out, "logits", None).shape[1]
        if length != SEQ:
            yield {"length": length}
    except Exception:  # noqa: BLE001 - no unlabelled forward: no length to read
        pass
    if "pixel_values" in params:
        yield {"pixel_values": True}
    if "input_features" in params:
        for frames in (1, 2, 4, 8, 16):
            yield {"input_features": frames}
    if "use_cache" in params:  # no KV cache, as in training (HRM's recurrent layers outrun the cache's layers)
        yield {"no_cache": True}


def _forward_params(model: nn.Module) -> set:
    return set(inspect.signature(model.forward).parameters)


def _find(config, name: str):
    """``name`` on the config or the first of its sub-configs that has it."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    subs = [v for v in vars(config).values() if hasattr(v, "to_dict") and not isinstance(v, type)]
    return next((x for x in (_find(v, name) for v in subs) if x is not None), None)


def _make(cls, config, attn: str, tries: int = 4):
    for _ in range(tries):
        torch.manual_seed(0)
        try:
            return cls._from_config(config, attn_implementation=attn)
        except AttributeError as exc:  # a sub-config lacks what the model reads: lent by the parent, again
            if not lend_missing(config, exc):
                raise
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=attn)


def batch_fn(model: nn.Module, mapping: str, asked: dict | None = None):
    """seed -> a training batch for ``model``; ``asked``: the inputs :func:`build` found it needs (default: those
    it recorded on the model)."""
    config = model.config
    asked = getattr(model, "batch_inputs", {}) if asked is None else asked
    params = _forward_params(model)
    if mapping == "image-classification" and ("pixel_values" in params or "input_ids" not in params):
        vision = getattr(config, "vision_config", None) or config
        channels = getattr(config, "num_channels", None) or getattr(vision, "num_channels", None) or 3
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        patch = getattr(vision, "patch_size", None)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch

        def images(seed):
            g = torch.Generator().manual_seed(seed)
            batch = {"pixel_values": torch.randn(2, channels, size, size, generator=g),
                     "labels": torch.randint(0, config.num_labels, (2,), generator=g)}
            if "spatial_shapes" in params and patch:  # images given as patches (NaFlex): rows of patch pixels
                n = size // patch
                x = batch["pixel_values"][:, :, :n * patch, :n * patch].reshape(2, channels, n, patch, n, patch)
                batch["pixel_values"] = x.permute(0, 2, 4, 3, 5, 1).reshape(2, n * n, patch * patch * channels)
                batch["pixel_attention_mask"] = torch.ones(2, n * n, dtype=torch.long)
                batch["spatial_shapes"] = torch.tensor([[n, n]] * 2)
            return batch
        return images

    factors = getattr(config, "axial_pos_shape", None)  # factored positions fix the training length
    length = asked.get("length") or (int(torch.tensor(factors).prod()) if factors else SEQ)
    rows = 2 * (getattr(config, "num_codebooks", None) or 1)  # one row per codebook of each sample

    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    top = min(VOCAB, vocab) - 16 if isinstance(vocab, int) and vocab > 32 else VOCAB - 16  # ids the model has

    def tokens(seed, length=length):
        return torch.randint(3, top, (rows, length), generator=torch.Generator().manual_seed(seed))

    def extra(seed):  # what the model asked for beyond its token ids
        g = torch.Generator().manual_seed(seed + 200)
        out = {}
        if asked.get("pixel_values"):
            vision = _find(config, "vision_config") or config
            size = getattr(vision, "image_size", 32)
            size = size[0] if isinstance(size, (list, tuple)) else size
            out["pixel_values"] = torch.randn(2, getattr(vision, "num_channels", 3) or 3, size, size, generator=g)
        if asked.get("no_cache"):
            out["use_cache"] = False
        if asked.get("input_features"):
            mels = _find(config, "num_mel_bins") or 80
            out["input_features"] = torch.randn(2, mels, length * asked["input_features"], generator=g)
        return out

    if mapping == "image-classification":  # a classifier of token ids (pixel clusters): ids and a label each
        return lambda seed: {"input_ids": tokens(seed), "labels": torch.randint(
            0, config.num_labels, (2,), generator=torch.Generator().manual_seed(seed + 100))}
    if mapping == "seq2seq-lm":
        return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed + 100), **extra(seed)}
    if rows > 2:  # codebooks: the ids (batch x codebooks, length), the labels (batch, length, codebooks)
        return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed).view(2, -1, length).transpose(1, 2)}
    return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed), **extra(seed)}
