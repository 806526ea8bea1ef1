"""Tiny SigLIP2s built in-process (transformers' own `Siglip2Model`, the judge of every SigLIP2-MoE test), and
naflex batches: images of different patch grids padded to one patch-sequence length."""

from __future__ import annotations

import pytest
import torch
from transformers import Siglip2Config, Siglip2Model

VOCAB = 100
PAD = 1
PATCH = 8
MAX_PATCHES = 20
SHAPES = [(4, 4), (2, 3), (3, 5)]  # each image's patch grid: 16, 6 and 15 real patches of 20


def tiny_siglip2_config(layers: int = 4, width: int = 32) -> Siglip2Config:
    """A width-32 SigLIP2: 8x8 patches, a 4x4 grid of position embeddings (resized per image), 100 tokens."""
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2)
    return Siglip2Config(
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=None,
                         eos_token_id=VOCAB - 1),
        vision_config=dict(tower, patch_size=PATCH, num_patches=16),
    )


def tiny_dense_siglip2(seed: int = 0, **kwargs) -> Siglip2Model:
    torch.manual_seed(seed)
    model = Siglip2Model(tiny_siglip2_config(**kwargs)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-1.5)
    return model


def tiny_siglip2_batch(seed: int = 1, seq: int = 12) -> dict[str, torch.Tensor]:
    """Patch sequences [3, 20, 3*8*8] of the grids in SHAPES (padding after each image's patches, as
    Siglip2ImageProcessor pads), their pixel_attention_mask and spatial_shapes, and padded token ids with a mask."""
    g = torch.Generator().manual_seed(seed)
    batch = len(SHAPES)
    pixel_mask = torch.zeros(batch, MAX_PATCHES, dtype=torch.long)
    for i, (h, w) in enumerate(SHAPES):
        pixel_mask[i, : h * w] = 1
    pixels = torch.randn(batch, MAX_PATCHES, 3 * PATCH * PATCH, generator=g) * pixel_mask[..., None]
    ids = torch.full((batch, seq), PAD, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = 3 + (b * 4) % (seq - 3)
        ids[b, :n] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[b, :n] = 1
    return {"pixel_values": pixels, "pixel_attention_mask": pixel_mask, "spatial_shapes": torch.tensor(SHAPES),
            "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def dense_siglip2() -> Siglip2Model:
    return tiny_dense_siglip2()


@pytest.fixture
def siglip2_batch() -> dict[str, torch.Tensor]:
    return tiny_siglip2_batch()
