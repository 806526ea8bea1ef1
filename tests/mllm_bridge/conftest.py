"""Tiny SigLIP / SigLIP-MoE / SigLIP2-MoE tower directories for the LLaVA tests (built in-process, saved like a user's).

The builders are reached through the fixtures at the end (`siglip_towers` gives the module's builders to tests that
need another variant), since a conftest is not importable by name under --import-mode=importlib.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import Siglip2Model, SiglipImageProcessor, SiglipModel

from conftest import tiny_siglip_config

IMAGE_SIZE = 32  # the digit grids' size: 16 patches of 8x8, every one a LLaVA image token (no CLS token)
WIDTH = 32


def tiny_dense_siglip(seed: int = 0) -> SiglipModel:
    """A 3-layer SigLIP of tests/conftest.py's builder (transformers' init: the logit scale and bias play no part in
    a LLaVA tower)."""
    torch.manual_seed(seed)
    return SiglipModel(tiny_siglip_config(layers=3, width=WIDTH)).eval()


def llava_siglip_processor(crop_size: bool = True) -> SiglipImageProcessor:
    """SigLIP's processor at the tower's size; with `crop_size` (LLaVA-NeXT's SigLIP convention) or without (as a
    SigLIP checkpoint from transformers ships)."""
    extra = {"crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}} if crop_size else {}
    return SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **extra)


def save_dense_siglip(out, seed: int = 0, crop_size: bool = True):
    tiny_dense_siglip(seed).save_pretrained(out)
    llava_siglip_processor(crop_size).save_pretrained(out)
    return out


def siglip_moe(seed: int = 0, moe_layers=(0, 1, 2), perturb: bool = True):
    """The SigLIP-MoE of `tiny_dense_siglip(seed)` (vision MoE in `moe_layers`, top-2 of 4); `perturb` moves the
    experts apart, so it no longer computes its dense base's function."""
    from encoder.siglip import sparse_upcycle_siglip

    moe = sparse_upcycle_siglip(tiny_dense_siglip(seed),
                                vision_moe=dict(num_experts=4, top_k=2, moe_layers=list(moe_layers)), seed=seed)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in moe.vision_model.encoder.layers:
                if hasattr(layer.mlp, "experts"):
                    up = layer.mlp.experts.up_proj
                    up.add_(0.5 * up.std() * torch.randn(up.shape, generator=g))
    return moe.eval()


def save_siglip_moe(out, seed: int = 0, moe_layers=(0, 1, 2), perturb: bool = True, vision_only: bool = False,
                    crop_size: bool = True):
    from encoder import save_clip_moe

    moe = siglip_moe(seed, moe_layers, perturb)
    return save_clip_moe(moe.vision_model if vision_only else moe, out, image_processor=llava_siglip_processor(crop_size))


def save_siglip2_moe(out, seed: int = 0):
    """A SigLIP2-MoE (naflex: no fixed image size), which cannot be a LLaVA tower."""
    from encoder import save_clip_moe
    from encoder.siglip2 import sparse_upcycle_siglip2

    torch.manual_seed(seed)
    dense = Siglip2Model(tiny_siglip_config(layers=2, width=WIDTH, siglip2=True)).eval()
    moe = sparse_upcycle_siglip2(dense, vision_moe=dict(num_experts=4, top_k=2, moe_layers=[0]))
    return save_clip_moe(moe, out)


@pytest.fixture(scope="session")
def siglip_towers():
    """This module's builders and constants (IMAGE_SIZE, save_dense_siglip, save_siglip_moe, save_siglip2_moe, ...)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def siglip_moe_dir(tmp_path_factory):
    """A full SigLIP-MoE directory (vision MoE in all 3 layers, experts perturbed apart) with SigLIP's processor."""
    return save_siglip_moe(tmp_path_factory.mktemp("siglip-towers") / "siglip-moe")


@pytest.fixture(scope="session")
def dense_siglip_dir(tmp_path_factory):
    """The dense base of `siglip_moe_dir`, its processor saved as transformers ships SigLIP's (no crop_size)."""
    return save_dense_siglip(tmp_path_factory.mktemp("siglip-towers") / "siglip", crop_size=False)
