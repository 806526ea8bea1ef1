"""Tiny SigLIPs for the training and evaluation tests of tests/upcycle: transformers' own `SiglipModel` (the judge of
every SigLIP result), a word tokenizer fitted to the digit-grid captions (SigLIP's SentencePiece vocabulary cannot
be built offline; any tokenizer that pads to a fixed length feeds the text tower the same way) and a
`SiglipImageProcessor` at the grids' 32 pixels."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import SiglipImageProcessor, SiglipModel

from conftest import tiny_siglip_config
from upcycle.data import ImageTextDataset, model_tokenizer_fn, processor_transform, read_pairs
from upcycle.embedded.small_base import build_word_tokenizer

TEXT_LENGTH = 24  # SigLIP pads every caption to its max_position_embeddings (64 in the published models)


def tiny_siglip(tokenizer, seed: int = 0, layers: int = 2, width: int = 32) -> SiglipModel:
    """A width-32 SigLIP over 32x32 images (16 patches) whose vocabulary is `tokenizer`'s, with SigLIP's initial
    logit scale (log 10) and a non-zero logit bias (transformers initialises it to zero, where a bias left out of a
    computation would go unnoticed)."""
    config = tiny_siglip_config(layers, width, vocab_size=len(tokenizer), max_position_embeddings=TEXT_LENGTH,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-1.5)
    return model


def siglip_image_processor() -> SiglipImageProcessor:
    """SigLIP's processor (squash resize to 32, mean = std = 0.5) at the grids' size."""
    return SiglipImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture
def siglip_processor() -> SiglipImageProcessor:
    return siglip_image_processor()


@pytest.fixture(scope="session")
def grid_captions(grids_dir) -> list[str]:
    return [r["conversations"][1]["value"] for r in json.loads((grids_dir / "train.json").read_text())]


@pytest.fixture(scope="session")
def siglip_tokenizer(grid_captions):
    return build_word_tokenizer(grid_captions, TEXT_LENGTH)


@pytest.fixture
def make_tiny_siglip(siglip_tokenizer):
    """seed -> a fresh tiny SigLIP over the grids' tokenizer."""
    return lambda seed=0, **kwargs: tiny_siglip(siglip_tokenizer, seed, **kwargs)


@pytest.fixture
def siglip_dataset(grids_dir, siglip_tokenizer):
    """The grids' training pairs as a SigLIP is fed: its image processor, captions padded to TEXT_LENGTH, no mask."""
    config = tiny_siglip(siglip_tokenizer).config
    return ImageTextDataset(read_pairs(grids_dir / "train.json"), processor_transform(siglip_image_processor()),
                            model_tokenizer_fn(siglip_tokenizer, config))


@pytest.fixture(scope="session")
def siglip_dir(tmp_path_factory, siglip_tokenizer):
    """A tiny dense SigLIP saved as a transformers directory with its image processor and tokenizer."""
    out = tmp_path_factory.mktemp("models") / "siglip"
    tiny_siglip(siglip_tokenizer).save_pretrained(out)
    siglip_image_processor().save_pretrained(out)
    siglip_tokenizer.save_pretrained(out)
    return out
