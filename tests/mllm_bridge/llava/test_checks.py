"""`python -m mllm_bridge check | swap-tower` on LLaVA-1.6 (anyres) checkpoints and on what LLaVA configs carry.

The tiny tower takes 32x32 crops of 4x4 patches (16 tokens per crop). With pinpoints 32x64, 64x32 and 64x64
(width x height), spatial_unpad gives the global view (16) plus the unpadded grid with one image_newline per row:
an image exactly 64x64 keeps the whole 8x8 grid, 16 + 8 * (8 + 1) = 88 tokens; an extreme shape unpads to nothing.
"""

import json

import pytest
from conftest import update_config_json
from transformers import CLIPVisionConfig, CLIPVisionModel

from encoder.convert.dense import default_image_processor
from mllm_bridge.cli import main
from mllm_bridge.llava.checks import image_layout, image_tokens
from mllm_bridge.llava.config import read_llava_config
from mllm_bridge.llava.tower_info import read_tower

PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ANYRES = {"image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS, "mm_patch_merge_type": "spatial_unpad"}


def check(directory, capsys) -> tuple[int, str]:
    status = main(["check", str(directory)])
    return status, capsys.readouterr().out


@pytest.mark.parametrize(("layout", "tokens"), [
    ({}, "16 image tokens\n"),
    ({"image_aspect_ratio": "pad"}, "16 image tokens\n"),
    (ANYRES, "16..88 image tokens per image, by its shape"),
    ({**ANYRES, "image_grid_pinpoints": "(1x1),...,(2x2)"}, "16..88 image tokens per image, by its shape"),
    ({**ANYRES, "mm_patch_merge_type": "flat"}, "48..80 image tokens per image"),  # (1 + 2) or (1 + 4) crops x 16
    ({**ANYRES, "mm_patch_merge_type": "flat", "mm_vision_select_feature": "cls_patch"}, "51..85 image tokens"),
])
def test_check_reports_the_range_of_image_tokens_under_anyres(llava_config_dir, capsys, layout, tokens):
    update_config_json(llava_config_dir, **layout)
    status, out = check(llava_config_dir, capsys)
    assert tokens in out, out
    assert status == 0 and "mismatches: none" in out, out
    range_form = "(1x1)" in str(layout)  # fits the tower, but llava-torch's own generate cannot parse it
    assert ("is LLaVA-NeXT's range form" in out) is range_form
    assert ("write the list it stands for with this tower: [[32, 32], [32, 64], [64, 32], [64, 64]]" in out) is range_form


def test_the_range_is_what_llava_counts_for_real_image_shapes(llava_config_dir):
    """Every shape lands inside the reported range, and its ends are reached (the most by a pinpoint's shape)."""
    update_config_json(llava_config_dir, **ANYRES)
    config = read_llava_config(llava_config_dir)
    tower = read_tower(json.loads((llava_config_dir / "config.json").read_text())["mm_vision_tower"])
    layout = image_layout(config, tower)
    fewest, most = image_tokens(config, tower)
    counts = {layout.count((w, h)) for w in (1, 7, 30, 64, 100, 640) for h in (1, 9, 32, 64, 333, 640)}
    assert (fewest, most) == (16, 88) and min(counts) == fewest and max(counts) == most


def test_check_names_pinpoints_that_the_tower_cannot_tile(llava_config_dir, capsys):
    update_config_json(llava_config_dir, **{**ANYRES, "image_grid_pinpoints": [[48, 64], [64, 64]]})
    status, out = check(llava_config_dir, capsys)
    assert status == 1 and "mismatches (1):" in out
    assert "image_grid_pinpoints [[48, 64]] are not multiples of the tower's image size 32" in out
    assert "unknown image tokens" in out


def test_check_notes_images_larger_than_the_context_and_refuses_when_none_fits(llava_config_dir, capsys):
    update_config_json(llava_config_dir, **ANYRES, tokenizer_model_max_length=60)
    status, out = check(llava_config_dir, capsys)
    assert status == 0 and "the largest images take up to 88 tokens, not fewer than the 60-token context" in out
    update_config_json(llava_config_dir, tokenizer_model_max_length=16)
    status, out = check(llava_config_dir, capsys)
    assert status == 1 and "every image takes at least 16 tokens, which do not fit" in out


def test_check_refuses_llavas_s2_tower(llava_config_dir, capsys):
    update_config_json(llava_config_dir, s2=True, s2_scales="32,64,96")
    status, out = check(llava_config_dir, capsys)
    assert status == 1 and "mismatches (1):" in out and "s2 is set (LLaVA's multi-scale S2 tower" in out


def wide_crop_tower(path):
    """A dense CLIP tower over 48x48 crops: a pinpoint of 32 or 64 pixels is no multiple of it."""
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                              image_size=48, patch_size=8)
    CLIPVisionModel(config).save_pretrained(path)
    default_image_processor(48).save_pretrained(path)
    return path


@pytest.mark.parametrize(("config", "tower", "message"), [
    ({"s2": True}, "clip_moe_dir", "s2 is set (LLaVA's multi-scale S2 tower, s2_scales None)"),
    (ANYRES, "wide", "[[32, 64], [64, 32], [64, 64]] are not multiples of the tower's image size 48"),
    (ANYRES, "cls", "mm_patch_merge_type spatial_unpad lays the patches out as a grid, which has no place for the CLS"),
], ids=["s2", "pinpoints", "cls-in-grid"])
def test_swap_tower_refuses_what_the_new_tower_cannot_serve_in_one_line(llava_config_dir, tmp_path, capsys, request,
                                                                        config, tower, message):
    update_config_json(llava_config_dir, **config)
    before = (llava_config_dir / "config.json").read_bytes()
    path = wide_crop_tower(tmp_path / "wide") if tower == "wide" else request.getfixturevalue("clip_moe_dir")
    extra = ["--select-feature", "cls_patch"] if tower == "cls" else []
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.endswith("left unchanged)")
    assert (llava_config_dir / "config.json").read_bytes() == before
    assert sorted(p.name for p in llava_config_dir.iterdir()) == ["config.json"]


def test_swap_tower_reports_the_range_and_its_change(llava_config_dir, dense_clip_dir, capsys):
    update_config_json(llava_config_dir, **{**ANYRES, "mm_patch_merge_type": "flat"})
    assert main(["swap-tower", str(llava_config_dir), "--tower", str(dense_clip_dir),
                 "--select-feature", "cls_patch"]) == 0
    out = capsys.readouterr().out
    assert "feature 'cls_patch' -> 51..85 image tokens per image" in out
    assert "image tokens per image change from 48..80 to 51..85" in out
