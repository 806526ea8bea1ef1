"""What a model's family asks of its text inputs and of its contrastive loss: CLIP pads captions to the batch's
longest and masks the padding, trained with InfoNCE; SigLIP and SigLIP2 pad to a fixed length with no mask and
pool the last position, trained with the pairwise sigmoid loss and a learned `logit_bias`.

The family comes from `encoder.family.family_of` (dense or MoE, either answer the same).
"""

from __future__ import annotations

from typing import Any

from encoder.family import family_of
from encoder.utils.errors import UserError

from .datasets import Tokenize, tokenizer_fn

# The families whose contrastive objective is SigLIP's sigmoid loss and whose text tower is fed fixed-length,
# unmasked token ids (both facts come from the same training recipe, big_vision's).
SIGMOID_FAMILIES = ("siglip", "siglip2")


def uses_sigmoid_loss(config: Any) -> bool:
    """True when `config` (a model's config, a directory or a config dict) is of a SigLIP-style family."""
    return family_of(config).family.name in SIGMOID_FAMILIES


# Families whose images the datasets here cannot produce: SigLIP2's processor cuts each image into a variable number
# of patches (pixel_values [B, max_patches, C*p*p] with pixel_attention_mask and spatial_shapes), while
# `ImageTextDataset` stacks one [3, H, W] tensor per image.
PATCH_SEQUENCE_FAMILIES = ("siglip2",)


def check_image_inputs(config: Any) -> None:
    """A UserError (one line) for a model whose images these datasets cannot feed (`PATCH_SEQUENCE_FAMILIES`)."""
    match = family_of(config)
    if match.family.name in PATCH_SEQUENCE_FAMILIES:
        raise UserError(f"a {match.label} model takes variable-resolution patch sequences (pixel_attention_mask, "
                        "spatial_shapes), which upcycle's image-text datasets do not produce yet; train or evaluate "
                        "a CLIP or SigLIP model here")


def family_label(config: Any) -> str:
    """What messages call the model: "SigLIP-MoE", "CLIP", ..."""
    return family_of(config).label


def model_tokenizer_fn(tokenizer: Any, config: Any) -> Tokenize:
    """The tokenize callable that feeds the text tower of the full model `config` as it was trained: its
    `text_config.max_position_embeddings` as the length, fixed and unmasked for SigLIP-style families."""
    return tokenizer_fn(tokenizer, config.text_config.max_position_embeddings, fixed_length=uses_sigmoid_loss(config))
