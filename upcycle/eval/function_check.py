"""Function-preservation check: how far a CLIP-MoE's outputs are from its dense base's on one batch."""

from __future__ import annotations

import torch
from transformers import CLIPModel

from encoder import CLIPMoEModel


def random_inputs(model: CLIPModel, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random pixels and token ids ending in the tower's end-of-text token, sized for `model`."""
    g = torch.Generator().manual_seed(seed)
    v, t = model.config.vision_config, model.config.text_config
    seq = min(seq, t.max_position_embeddings)
    ids = torch.randint(1, t.vocab_size - 2, (batch, seq), generator=g)
    eos = t.eos_token_id if t.eos_token_id not in (None, 2) else t.vocab_size - 1
    ids[:, -1] = eos
    pixels = torch.randn(batch, v.num_channels, v.image_size, v.image_size, generator=g)
    return {"pixel_values": pixels, "input_ids": ids}


@torch.no_grad()
def max_output_diff(dense: CLIPModel, moe: CLIPMoEModel, inputs: dict[str, torch.Tensor] | None = None) -> dict:
    """Max |MoE - dense| of the image/text embeddings and of every hidden state of both towers."""
    inputs = inputs if inputs is not None else random_inputs(dense)
    a = dense(**inputs, output_hidden_states=True)
    b = moe(**inputs, output_hidden_states=True)

    def hidden(x, y):
        return max((p - q).abs().max().item() for p, q in zip(x.hidden_states, y.hidden_states))

    return {
        "image_embeds": (a.image_embeds - b.image_embeds).abs().max().item(),
        "text_embeds": (a.text_embeds - b.text_embeds).abs().max().item(),
        "vision_hidden_states": hidden(a.vision_model_output, b.vision_model_output),
        "text_hidden_states": hidden(a.text_model_output, b.text_model_output),
    }
