"""Tiny digit-grid data and a tiny small-base CLIP for training tests (session fixtures; import them)."""

from __future__ import annotations

import json

import pytest

from upcycle.data import ImageTextDataset, processor_transform, read_pairs, tokenizer_fn
from upcycle.data.digit_grids import make_digit_grids
from upcycle.small_base import init_small_clip


@pytest.fixture(scope="session")
def grids_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "grids"
    make_digit_grids(out, num_train=96, num_val=8, num_test=32, image_size=32, grid=2, seed=0)
    return out


@pytest.fixture(scope="session")
def base_clip_dir(tmp_path_factory, grids_dir):
    """A width-32, 2-layer dense CLIP with a word tokenizer fitted to the digit captions."""
    out = tmp_path_factory.mktemp("models") / "base"
    captions = [r["conversations"][1]["value"] for r in json.loads((grids_dir / "train.json").read_text())]
    init_small_clip(out, captions, width=32, layers=2, heads=2, image_size=32, patch_size=8, max_length=24, seed=0)
    return out


def dataset_for(loaded, data_file):
    """The training dataset of a loaded CLIP over a data file (what the commands build)."""
    pairs = read_pairs(data_file)
    max_len = loaded.model.config.text_config.max_position_embeddings
    return ImageTextDataset(pairs, processor_transform(loaded.image_processor), tokenizer_fn(loaded.tokenizer, max_len))
