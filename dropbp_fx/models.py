"""Tiny transformers models of any type, for checks before a long run (``python -m dropbp_fx explain TYPE``) and
for the catalogue benchmark: built from the type's default config shrunk by one generic rule
(:mod:`dropbp_fx.shrink`), random init, with a batch maker."""

from __future__ import annotations

import torch
from torch import nn

from dropbp_fx.shrink import VOCAB, shrink
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
    """The shrunk model (fp32, train mode, seed 0) and the attention implementation it got."""
    import transformers

    from transformers.models.auto import modeling_auto

    config = shrink(default_config(model_type))
    if mapping == "causal-lm":
        config.is_decoder = True  # what a causal LM head is for (BERT-style and Reformer heads ask for it)
    if mapping == "seq2seq-lm":  # shifting the labels right needs both
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        if getattr(config, "decoder_start_token_id", None) is None:
            config.decoder_start_token_id = config.pad_token_id
    name = getattr(modeling_auto, MAPPINGS[mapping][0])[model_type]
    cls = getattr(transformers, name[0] if isinstance(name, (tuple, list)) else name)
    if not isinstance(config, cls.config_class):  # MusicgenForCausalLM takes the decoder part of MusicgenConfig
        config = next((v for v in vars(config).values() if isinstance(v, cls.config_class)), config)
    for attn in ("sdpa", "eager"):
        try:
            model = _make(cls, config, attn)
            break
        except (ValueError, NotImplementedError):  # no sdpa for this architecture: eager
            if attn == "eager":
                raise
    return model.float().train(), attn


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


def batch_fn(model: nn.Module, mapping: str):
    config = model.config
    if mapping == "image-classification":
        vision = getattr(config, "vision_config", None) or config
        channels = getattr(config, "num_channels", None) or getattr(vision, "num_channels", None) or 3
        size = getattr(vision, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size

        def images(seed):
            g = torch.Generator().manual_seed(seed)
            return {"pixel_values": torch.randn(2, channels, size, size, generator=g),
                    "labels": torch.randint(0, config.num_labels, (2,), generator=g)}
        return images

    factors = getattr(config, "axial_pos_shape", None)  # factored positions fix the training length
    length = int(torch.tensor(factors).prod()) if factors else SEQ
    rows = 2 * (getattr(config, "num_codebooks", None) or 1)  # one row per codebook of each sample

    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size", None)
    top = min(VOCAB, vocab) - 16 if isinstance(vocab, int) and vocab > 32 else VOCAB - 16  # ids the model has

    def tokens(seed, length=length):
        return torch.randint(3, top, (rows, length), generator=torch.Generator().manual_seed(seed))

    if mapping == "seq2seq-lm":
        return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed + 100)}
    if rows > 2:  # codebooks: the ids (batch x codebooks, length), the labels (batch, length, codebooks)
        return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed).view(2, -1, length).transpose(1, 2)}
    return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed)}

