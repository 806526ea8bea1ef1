"""A SigLIP / SigLIP-MoE directory as LLaVA's vision tower, judged by transformers' SigLIP classes and llava-torch.

SigLIP has no CLS token: LLaVA's 'patch' select keeps every patch token of `hidden_states[select_layer]` (as
LLaVA-NeXT's SigLIP tower does), and the image processor is SigLIP's own, given the attributes LLaVA reads.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import SiglipImageProcessor, SiglipVisionModel

from encoder import CLIPMoEVisionTower, LlavaVisionTower
from encoder.siglip import SiglipMoEVisionModel
from encoder.utils.errors import UserError

IMAGE_SIZE = 32  # the towers' (tests/mllm_bridge/conftest.py)


def llava_args(layer: int = -2, feature: str = "patch") -> SimpleNamespace:
    return SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature)


def pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def hidden_states(model, px):
    with torch.no_grad():
        return model(px, output_hidden_states=True).hidden_states


def photo(width: int = 48, height: int = 24) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_dense_siglip_features_are_transformers_hidden_states_with_every_token(dense_siglip_dir, layer, feature):
    tower = CLIPMoEVisionTower(str(dense_siglip_dir), llava_args(layer, feature))
    assert type(tower.vision_tower) is SiglipVisionModel and not tower.is_moe
    px = pixels()
    expected = hidden_states(SiglipVisionModel.from_pretrained(dense_siglip_dir).eval(), px)[layer]
    assert expected.shape == (3, 16, 32)  # no CLS token: 'patch' keeps all 16
    assert torch.equal(tower(px), expected)
    assert (tower.hidden_size, tower.num_patches_per_side, tower.num_patches, tower.image_size) == (32, 4, 16, 32)
    assert isinstance(tower, LlavaVisionTower)


def test_siglip_moe_without_moe_layers_gives_the_dense_features(dense_siglip_dir, tmp_path, siglip_towers):
    no_moe = siglip_towers.save_siglip_moe(tmp_path / "no-moe-layers", moe_layers=(), perturb=False)
    tower = CLIPMoEVisionTower(str(no_moe), llava_args())
    assert type(tower.vision_tower) is SiglipMoEVisionModel and tower.is_moe
    px = pixels()
    expected = hidden_states(SiglipVisionModel.from_pretrained(dense_siglip_dir).eval(), px)[-2]
    torch.testing.assert_close(tower(px), expected, atol=1e-6, rtol=1e-6)


def test_siglip_moe_features_are_its_own_hidden_states_not_the_dense_ones(siglip_moe_dir, dense_siglip_dir):
    tower = CLIPMoEVisionTower(str(siglip_moe_dir), llava_args())
    px = pixels()
    features = tower(px)
    moe_states = hidden_states(SiglipMoEVisionModel.from_pretrained(siglip_moe_dir).eval(), px)
    assert torch.equal(features, moe_states[-2])
    assert not torch.allclose(features, hidden_states(SiglipVisionModel.from_pretrained(dense_siglip_dir).eval(), px)[-2],
                              atol=1e-3)
    listed = tower(list(px))
    assert [f.shape for f in listed] == [(1, 16, 32)] * 3
    torch.testing.assert_close(torch.cat(listed), features, atol=1e-6, rtol=1e-6)


def test_a_vision_only_export_and_delay_load_give_the_same_tower(siglip_moe_dir, tmp_path, siglip_towers):
    export = siglip_towers.save_siglip_moe(tmp_path / "vision-only", vision_only=True)
    px = pixels(2)
    full = CLIPMoEVisionTower(str(siglip_moe_dir), llava_args())
    assert torch.equal(CLIPMoEVisionTower(str(export), llava_args())(px), full(px))
    delayed = CLIPMoEVisionTower(str(siglip_moe_dir), llava_args(), delay_load=True)
    assert not delayed.is_loaded and delayed.hidden_size == 32 and delayed.num_patches == 16
    delayed.load_model()
    assert torch.equal(delayed(px), full(px))


@pytest.mark.parametrize("which", ["dense", "moe"])
def test_the_image_processor_is_siglips_with_the_attributes_llava_reads(which, dense_siglip_dir, siglip_moe_dir, tmp_path):
    directory = dense_siglip_dir if which == "dense" else siglip_moe_dir
    processor = CLIPMoEVisionTower(str(directory), llava_args()).image_processor
    reference = SiglipImageProcessor.from_pretrained(directory)
    assert type(processor) is SiglipImageProcessor
    assert processor.crop_size["height"] == processor.crop_size["width"] == IMAGE_SIZE
    assert processor.size["shortest_edge"] == IMAGE_SIZE and tuple(processor.image_mean) == (0.5, 0.5, 0.5)
    # SigLIP's own preprocessing (a squash to 32x32, not a shortest-edge resize and crop), on a 2:1 image
    ours = processor.preprocess(photo(), return_tensors="pt")["pixel_values"]
    assert ours.shape == (1, 3, 32, 32) and torch.equal(ours, reference(photo(), return_tensors="pt")["pixel_values"])
    # re-saved as SigLIP's processor (LLaVA's training saves the tower's processor with the checkpoint)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "SiglipImageProcessor" and saved["size"] == {"height": 32, "width": 32}
    assert saved["crop_size"] == {"height": 32, "width": 32}


def test_llavas_process_images_takes_the_siglip_processor_in_every_mode(siglip_moe_dir):
    from llava.mm_utils import process_images

    processor = CLIPMoEVisionTower(str(siglip_moe_dir), llava_args()).image_processor
    images = [photo(), photo(24, 48)]
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    assert process_images(images, processor, SimpleNamespace(image_aspect_ratio="pad")).shape == (2, 3, 32, 32)
    anyres = process_images(images, processor,
                            SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=pinpoints))
    assert anyres.shape == (2, 3, 3, 32, 32)  # the global view + 2 crops each
    # the global view is the image squashed to the tower's size, then SigLIP's processing
    squashed = processor.preprocess(photo().resize((32, 32)), return_tensors="pt")["pixel_values"][0]
    assert torch.equal(anyres[0, 0], squashed)


def test_a_processor_of_another_size_or_none_is_one_line(tmp_path, siglip_towers):
    wrong = siglip_towers.save_siglip_moe(tmp_path / "wrong-size")
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(wrong)
    with pytest.raises(UserError, match=r"size is \{'height': 64, 'width': 64\}.*takes 32x32") as err:
        CLIPMoEVisionTower(str(wrong), llava_args())
    assert "\n" not in str(err.value)
    (wrong / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match="has no preprocessor_config.json"):
        CLIPMoEVisionTower(str(wrong), llava_args())
    (wrong / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="preprocessor_config.json holds a JSON list, not an object"):
        CLIPMoEVisionTower(str(wrong), llava_args())


@pytest.mark.parametrize("delay_load", [False, True])
def test_a_siglip2_naflex_tower_is_refused_in_one_line(tmp_path, delay_load, siglip_towers):
    directory = siglip_towers.save_siglip2_moe(tmp_path / "siglip2-moe")
    with pytest.raises(UserError, match="SigLIP2-MoE tower, which takes variable-resolution patch sequences") as err:
        CLIPMoEVisionTower(str(directory), llava_args(), delay_load=delay_load)
    assert "\n" not in str(err.value)
