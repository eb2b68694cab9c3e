"""Tiny transformers models of any type, for checks before a long run (``python -m dropbp_fx explain TYPE``) and
for the catalogue benchmark: built from the type's default config shrunk by one generic rule
(:mod:`dropbp_fx.shrink`), random init, with a batch maker."""

from __future__ import annotations

import torch
from torch import nn

from dropbp_fx.shrink import VOCAB, shrink

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

    config = shrink(transformers.AutoConfig.for_model(model_type))
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
        torch.manual_seed(0)
        try:
            model = cls._from_config(config, attn_implementation=attn)
            break
        except (ValueError, NotImplementedError):  # no sdpa for this architecture: eager
            if attn == "eager":
                raise
    return model.float().train(), attn


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

    def tokens(seed, length=SEQ):
        return torch.randint(3, VOCAB - 16, (2, length), generator=torch.Generator().manual_seed(seed))

    if mapping == "seq2seq-lm":
        return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed + 100)}
    return lambda seed: {"input_ids": tokens(seed), "labels": tokens(seed)}

