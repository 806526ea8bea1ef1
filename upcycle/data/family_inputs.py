"""What a model's family asks of its text inputs and of its contrastive loss: CLIP pads captions to the batch's
longest and masks the padding, trained with InfoNCE; SigLIP and SigLIP2 pad to a fixed length with no mask and
pool the last position, trained with the pairwise sigmoid loss and a learned `logit_bias`.

The family comes from `encoder.family.family_of` (dense or MoE, either answer the same).
"""

from __future__ import annotations

from typing import Any

from encoder.family import family_of

from .datasets import Tokenize, tokenizer_fn

# The families whose contrastive objective is SigLIP's sigmoid loss and whose text tower is fed fixed-length,
# unmasked token ids (both facts come from the same training recipe, big_vision's).
SIGMOID_FAMILIES = ("siglip", "siglip2")


def uses_sigmoid_loss(config: Any) -> bool:
    """True when `config` (a model's config, a directory or a config dict) is of a SigLIP-style family."""
    return family_of(config).family.name in SIGMOID_FAMILIES


def family_label(config: Any) -> str:
    """What messages call the model: "SigLIP-MoE", "CLIP", ..."""
    return family_of(config).label


def model_tokenizer_fn(tokenizer: Any, config: Any) -> Tokenize:
    """The tokenize callable that feeds the text tower of the full model `config` as it was trained: its
    `text_config.max_position_embeddings` as the length, fixed and unmasked for SigLIP-style families."""
    return tokenizer_fn(tokenizer, config.text_config.max_position_embeddings, fixed_length=uses_sigmoid_loss(config))
