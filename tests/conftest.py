"""Shared tiny models: everything is built in-process (no network, no hub)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 100
EOS = VOCAB - 1
BOS = VOCAB - 2


def tiny_clip_config(hidden_act: str = "quick_gelu", layers: int = 4, width: int = 32) -> CLIPConfig:
    """A 4-layer, width-32 CLIP over 32x32 images (16 patches) and a 100-token vocabulary."""
    return CLIPConfig(
        text_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
            vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=0,
            hidden_act=hidden_act,
        ),
        vision_config=dict(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
            image_size=32, patch_size=8, hidden_act=hidden_act,
        ),
        projection_dim=16,
    )


def tiny_dense_clip(seed: int = 0, **kwargs) -> CLIPModel:
    torch.manual_seed(seed)
    return CLIPModel(tiny_clip_config(**kwargs)).eval()


def tiny_batch(batch: int = 3, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Pixels plus right-padded token ids (BOS ... EOS, then zeros) with a matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        n = 4 + (b * 3) % (seq - 4)
        ids[b, 0] = BOS
        ids[b, 1 : n - 1] = torch.randint(1, BOS, (n - 2,), generator=g)
        ids[b, n - 1] = EOS
        mask[b, :n] = 1
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask}


@pytest.fixture
def dense_clip() -> CLIPModel:
    return tiny_dense_clip()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return tiny_batch()
