"""Tiny SigLIPs built in-process (transformers' own `SiglipModel`, the judge of every SigLIP-MoE test)."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipConfig, SiglipModel

VOCAB = 100
PAD = 1  # SigLIP pads with its pad token to a fixed length and is usually run without an attention mask
SEQ = 12


def tiny_siglip_config(layers: int = 4, width: int = 32, vision_use_head: bool = True) -> SiglipConfig:
    """A width-32 SigLIP over 32x32 images (16 patches, no class token) and a 100-token vocabulary."""
    tower = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2)
    return SiglipConfig(
        text_config=dict(tower, vocab_size=VOCAB, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=None,
                         eos_token_id=VOCAB - 1),
        vision_config=dict(tower, image_size=32, patch_size=8, vision_use_head=vision_use_head),
    )


def tiny_dense_siglip(seed: int = 0, **kwargs) -> SiglipModel:
    """A tiny SiglipModel with a non-trivial logit scale and bias (transformers inits both to zero)."""
    torch.manual_seed(seed)
    model = SiglipModel(tiny_siglip_config(**kwargs)).eval()
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # log 10, SigLIP's init
        model.logit_bias.fill_(-1.5)
    return model


def tiny_siglip_batch(batch: int = 3, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """Pixels plus token ids padded with PAD to `seq` (texts of different lengths) and the matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, seq), PAD, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = 3 + (b * 4) % (seq - 3)
        ids[b, :n] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[b, :n] = 1
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def dense_siglip() -> SiglipModel:
    return tiny_dense_siglip()


@pytest.fixture
def siglip_batch() -> dict[str, torch.Tensor]:
    return tiny_siglip_batch()


@pytest.fixture
def make_dense_siglip():
    """The builder itself, for tests that need another seed or shape."""
    return tiny_dense_siglip
