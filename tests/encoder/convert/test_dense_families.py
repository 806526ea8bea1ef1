"""Dense bases of every family (`encoder.convert.dense`, `encoder.loading.load_clip`): a SigLIP or SigLIP2 directory
is read with its family's classes (config, model, image processor), streamed like a CLIP's, and checked in the same
one-line way; models of no family, MoE directories and tower directories are refused naming what to give instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionModel,
)

import encoder  # noqa: F401  (registers every family)
from encoder.convert.dense import load_dense_clip, open_dense_clip
from encoder.family import UnknownFamily
from encoder.loading import load_clip
from encoder.utils.errors import UserError

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TEXT = {**TOWER, "vocab_size": 50, "max_position_embeddings": 16, "pad_token_id": 0, "eos_token_id": 1,
        "bos_token_id": None}


def _siglip(path=None) -> SiglipModel:
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=TEXT, vision_config={**TOWER, "image_size": 32, "patch_size": 8}))
    if path is not None:
        model.save_pretrained(path)
    return model.eval()


def test_a_siglip_directory_is_streamed_with_its_family_classes(tmp_path):
    dense = _siglip(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.1, 0.2, 0.3]).save_pretrained(tmp_path)
    source = open_dense_clip(str(tmp_path))
    try:
        assert source.streamed and type(source.config) is SiglipConfig and source.family.name == "siglip"
        assert source.dtype == torch.float32
        assert isinstance(source.image_processor, SiglipImageProcessor)
        assert list(source.image_processor.image_mean) == [0.1, 0.2, 0.3]  # the saved processor, not a default
        assert torch.equal(source.tensors.get("logit_bias"), dense.logit_bias.detach())
        assert source.tokenizer is None  # a directory without tokenizer files ships none
    finally:
        source.close()
    loaded = load_clip(tmp_path)
    assert type(loaded.model) is SiglipModel and not loaded.is_moe


def test_default_preprocessing_is_the_familys_at_the_models_size(tmp_path):
    _siglip(tmp_path / "siglip")
    processor = load_dense_clip(str(tmp_path / "siglip")).image_processor
    assert type(processor) is SiglipImageProcessor and dict(processor.size)["height"] == 32
    torch.manual_seed(0)
    siglip2 = Siglip2Model(Siglip2Config(text_config=TEXT, vision_config={**TOWER, "patch_size": 8,
                                                                          "num_patches": 16}))
    dense = load_dense_clip(siglip2)  # an in-memory model is taken as it is
    assert dense.model is siglip2
    assert type(dense.image_processor) is Siglip2ImageProcessor
    assert (dense.image_processor.patch_size, dense.image_processor.max_num_patches) == (8, 16)


def test_a_siglip_processor_of_another_size_is_one_line(tmp_path):
    _siglip(tmp_path)
    SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="size is .* but the model takes 32x32 images") as err:
        open_dense_clip(str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", ["no_family", "moe", "tower"])
def test_what_is_not_a_full_dense_model_of_a_family_is_refused(case, tmp_path):
    if case == "no_family":
        tmp_path.joinpath("config.json").write_text(json.dumps({"model_type": "bert"}))
        expected, error = "'bert' model, not a CLIP, SigLIP or SigLIP2", UnknownFamily
    elif case == "moe":
        from encoder.siglip import sparse_upcycle_siglip

        sparse_upcycle_siglip(_siglip(), vision_moe={"moe_layers": [0]}).save_pretrained(tmp_path)
        expected, error = "already a SigLIP-MoE; give the dense SigLIP", UserError
    else:
        SiglipVisionModel(_siglip().config.vision_config).save_pretrained(tmp_path)
        expected, error = "SigLIP vision tower only", UserError
    for load in (open_dense_clip, load_dense_clip):
        with pytest.raises(error, match=expected):
            load(str(tmp_path))
