"""Function-preservation check: how far a MoE model's outputs are from its dense base's on one batch (any family)."""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from encoder.family import family_of


def random_inputs(model: PreTrainedModel, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small random batch sized for `model`. A CLIP's: random pixels and token ids ending in its end-of-text token
    (it pools there). SigLIP-style families (`Family.sigmoid_loss`) get token ids anywhere in the vocabulary (SigLIP attends to every position and
    pools the last; its configs' default token ids are CLIP's, outside a SigLIP vocabulary) and square images, or, for
    SigLIP2's naflex tower, patch sequences: one image on the full grid of its position table and the others on a
    smaller grid padded to the same length (with `pixel_attention_mask` and `spatial_shapes`), so padding is checked
    too."""
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision_config, model.config.text_config
    if family_of(model.config).family.sigmoid_loss:
        return _patch_family_inputs(v, t, batch, seq, g)
    seq = min(seq, t.max_position_embeddings)
    ids = torch.randint(1, t.vocab_size - 2, (batch, seq), generator=g)
    eos = t.eos_token_id if t.eos_token_id not in (None, 2) else t.vocab_size - 1
    ids[:, -1] = eos
    pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids}


def _patch_family_inputs(vision, text, batch: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, text.vocab_size, (batch, min(seq, text.max_position_embeddings)), generator=g)
    if hasattr(vision, "image_size"):
        pixels = torch.randn(batch, vision.num_channels, vision.image_size, vision.image_size, generator=g)
        return {"pixel_values": pixels, "input_ids": ids}
    side = math.isqrt(vision.num_patches)
    grids = [(side, side)] + [(max(1, side - 1), max(1, side // 2))] * (batch - 1)
    mask = torch.zeros(batch, side * side, dtype=torch.long)
    for i, (h, w) in enumerate(grids):
        mask[i, : h * w] = 1
    pixels = torch.randn(batch, side * side, vision.num_channels * vision.patch_size ** 2, generator=g)
    return {"pixel_values": pixels * mask[..., None], "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor(grids), "input_ids": ids}


@torch.no_grad()
def max_output_diff(dense: PreTrainedModel, moe: PreTrainedModel, inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Max |MoE - dense| of the image-text logits (logit scale and, for SigLIP, logit bias applied), the image/text
    embeddings and every hidden state of both towers."""
    inputs = inputs if inputs is not None else random_inputs(dense)
    a = dense(**inputs, output_hidden_states=True)
    b = moe(**inputs, output_hidden_states=True)

    def hidden(x, y):
        return max((p - q).abs().max().item() for p, q in zip(x.hidden_states, y.hidden_states))

    return {
        "logits_per_image": (a.logits_per_image - b.logits_per_image).abs().max().item(),
        "image_embeds": (a.image_embeds - b.image_embeds).abs().max().item(),
        "text_embeds": (a.text_embeds - b.text_embeds).abs().max().item(),
        "vision_hidden_states": hidden(a.vision_model_output, b.vision_model_output),
        "text_hidden_states": hidden(a.text_model_output, b.text_model_output),
    }
