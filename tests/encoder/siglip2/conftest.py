"""Fixtures of tiny SigLIP2s (tests/conftest.py builds them: transformers' own `Siglip2Model`, the judge of every
SigLIP2-MoE test), and naflex batches: images of different patch grids padded to one patch-sequence length."""

from __future__ import annotations

import pytest
import torch
from transformers import Siglip2Model

from conftest import siglip_text_ids, tiny_dense_siglip

PATCH = 8
MAX_PATCHES = 20
SHAPES = [(4, 4), (2, 3), (3, 5)]  # each image's patch grid: 16, 6 and 15 real patches of 20


def tiny_siglip2_batch(seed: int = 1, seq: int = 12) -> dict[str, torch.Tensor]:
    """Patch sequences [3, 20, 3*8*8] of the grids in SHAPES (padding after each image's patches, as
    Siglip2ImageProcessor pads), their pixel_attention_mask and spatial_shapes, and padded token ids with a mask."""
    g = torch.Generator().manual_seed(seed)
    batch = len(SHAPES)
    pixel_mask = torch.zeros(batch, MAX_PATCHES, dtype=torch.long)
    for i, (h, w) in enumerate(SHAPES):
        pixel_mask[i, : h * w] = 1
    pixels = torch.randn(batch, MAX_PATCHES, 3 * PATCH * PATCH, generator=g) * pixel_mask[..., None]
    ids, mask = siglip_text_ids(batch, seq, g)
    return {"pixel_values": pixels, "pixel_attention_mask": pixel_mask, "spatial_shapes": torch.tensor(SHAPES),
            "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def dense_siglip2() -> Siglip2Model:
    return tiny_dense_siglip(siglip2=True)


@pytest.fixture
def siglip2_batch() -> dict[str, torch.Tensor]:
    return tiny_siglip2_batch()
