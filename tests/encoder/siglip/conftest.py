"""Fixtures of tiny SigLIPs (tests/conftest.py builds them: transformers' own `SiglipModel`, the judge of every
SigLIP-MoE test)."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipModel

from conftest import siglip_text_ids, tiny_dense_siglip

SEQ = 12


def tiny_siglip_batch(batch: int = 3, seq: int = SEQ, seed: int = 1) -> dict[str, torch.Tensor]:
    """Pixels plus token ids padded with SIGLIP_PAD to `seq` (texts of different lengths) and the matching mask."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = siglip_text_ids(batch, seq, g)
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
