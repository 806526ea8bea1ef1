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

def uses_sigmoid_loss(config: Any) -> bool:
    """True when `config` (a model's config, a directory or a config dict) is of a family trained the SigLIP way
    (`Family.sigmoid_loss`: the sigmoid loss, and fixed-length unmasked captions; both from big_vision's recipe)."""
    return family_of(config).family.sigmoid_loss


def check_image_inputs(config: Any) -> None:
    """A UserError (one line) for a model whose images these datasets cannot feed: a family of variable-resolution
    patch sequences (`Family.patch_sequences`, SigLIP2's naflex), while `ImageTextDataset` stacks one [3, H, W]
    tensor per image."""
    match = family_of(config)
    if match.family.patch_sequences:
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
