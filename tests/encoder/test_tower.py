"""The LLaVA vision tower over a CLIP-MoE: LLaVA's `CLIPVisionTower` interface and numbers."""

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPVisionModel

from conftest import save_tiny_clip_moe
from encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel, CLIPMoEVisionTower, LlavaVisionTower, is_clip_moe_dir
from encoder.utils.errors import UserError


def llava_args(layer: int = -2, feature: str = "patch", **extra) -> SimpleNamespace:
    return SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature, **extra)


def pixels(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def hidden_states(model, px: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(px, output_hidden_states=True).hidden_states


def test_dense_directory_behaves_exactly_like_llavas_tower(dense_clip_dir):
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    ours = CLIPMoEVisionTower(str(dense_clip_dir), llava_args())
    theirs = CLIPVisionTower(str(dense_clip_dir), llava_args())
    assert type(ours.vision_tower) is CLIPVisionModel and not ours.is_moe
    px = pixels()
    assert torch.equal(ours(px), theirs(px))
    for a, b in zip(ours(list(px)), theirs(list(px)), strict=True):
        assert torch.equal(a, b)
    for name in ("hidden_size", "num_patches_per_side", "num_patches", "dtype", "device"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert torch.equal(ours.dummy_feature, theirs.dummy_feature)
    assert ours.image_processor.to_dict() == theirs.image_processor.to_dict()
    assert isinstance(ours, LlavaVisionTower) and isinstance(theirs, LlavaVisionTower)


def test_clip_moe_features_are_the_selected_hidden_states_not_the_dense_ones(clip_moe_dir, dense_clip_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args())
    assert type(tower.vision_tower) is CLIPMoEVisionModel and tower.is_moe
    assert (tower.hidden_size, tower.num_patches_per_side, tower.num_patches) == (32, 4, 16)
    px = pixels()
    features = tower(px)
    moe_states = hidden_states(CLIPMoEVisionModel.from_pretrained(clip_moe_dir).eval(), px)
    dense_states = hidden_states(CLIPVisionModel.from_pretrained(dense_clip_dir).eval(), px)
    assert features.shape == (3, 16, 32)
    assert torch.equal(features, moe_states[-2][:, 1:])
    assert not torch.allclose(features, dense_states[-2][:, 1:], atol=1e-3)


@pytest.mark.parametrize("layer", [-1, -2, 0])
@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_select_layer_and_feature_follow_llava(clip_moe_dir, layer, feature):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args(layer, feature))
    px = pixels(2)
    expected = hidden_states(tower.vision_tower, px)[layer]
    assert len(hidden_states(tower.vision_tower, px)) == 5  # 4 layers + the embeddings
    assert torch.equal(tower(px), expected[:, 1:] if feature == "patch" else expected)


def test_unknown_select_feature_is_an_error(clip_moe_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args(feature="cls"))
    with pytest.raises(ValueError, match="'cls'"):
        tower(pixels(1))


def test_list_and_batch_agree(clip_moe_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args())
    px = pixels()
    listed = tower(list(px))
    assert isinstance(listed, list) and [f.shape for f in listed] == [(1, 16, 32)] * 3
    torch.testing.assert_close(torch.cat(listed), tower(px), atol=1e-6, rtol=1e-6)


def test_dtype_handling_follows_llava(clip_moe_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args())
    tower.to(dtype=torch.bfloat16)
    assert tower.dtype == torch.bfloat16 and tower.dummy_feature.dtype == torch.bfloat16
    px = pixels(2)
    out = tower(px)
    assert out.dtype == torch.float32
    expected = hidden_states(tower.vision_tower, px.to(torch.bfloat16))[-2][:, 1:].float()
    assert torch.equal(out, expected)
    assert all(f.dtype == torch.float32 for f in tower(list(px)))
    assert tower(px.to(torch.bfloat16)).dtype == torch.bfloat16


def test_delay_load_keeps_only_the_config_until_load_model(clip_moe_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args(), delay_load=True)
    assert not tower.is_loaded and not list(tower.parameters())
    assert type(tower.config) is CLIPMoEVisionConfig and tower.config.moe_layers == [0, 1, 2, 3]
    assert (tower.hidden_size, tower.num_patches) == (32, 16)
    tower.load_model()
    model = tower.vision_tower
    tower.load_model()  # a second call is a no-op, as in LLaVA
    assert tower.is_loaded and tower.vision_tower is model and tower.config is model.config

    forced = CLIPMoEVisionTower(str(clip_moe_dir), llava_args(unfreeze_mm_vision_tower=True), delay_load=True)
    assert forced.is_loaded


def test_tower_is_frozen_unless_made_trainable(clip_moe_dir):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args())
    assert not any(p.requires_grad for p in tower.parameters())
    assert tower(pixels(1)).grad_fn is None
    tower.requires_grad_(True)
    tower(pixels(1)).sum().backward()
    assert tower.vision_tower.encoder.layers[0].mlp.router.weight.grad is not None


def test_a_vision_only_export_loads_like_the_full_directory(clip_moe_dir, tmp_path):
    vision_only = save_tiny_clip_moe(tmp_path / "vision-only", vision_only=True)
    px = pixels(2)
    a = CLIPMoEVisionTower(str(vision_only), llava_args())
    b = CLIPMoEVisionTower(str(clip_moe_dir), llava_args())
    assert a.is_moe and torch.equal(a(px), b(px))


def test_is_clip_moe_dir(clip_moe_dir, dense_clip_dir, tmp_path):
    assert is_clip_moe_dir(clip_moe_dir) and is_clip_moe_dir(str(clip_moe_dir))
    assert not is_clip_moe_dir(dense_clip_dir)
    assert not is_clip_moe_dir(tmp_path / "missing")
    assert not is_clip_moe_dir(clip_moe_dir / "config.json")
    assert not is_clip_moe_dir(None)
    (tmp_path / "config.json").write_text("{not json")
    assert not is_clip_moe_dir(tmp_path)


@pytest.mark.parametrize("moe", [True, False])
def test_a_config_saved_with_return_dict_false_still_gives_features(clip_moe_dir, dense_clip_dir, moe):
    directory = clip_moe_dir if moe else dense_clip_dir
    tower = CLIPMoEVisionTower(str(directory), llava_args())
    px = pixels(2)
    expected = tower(px)
    tower.vision_tower.config.return_dict = False  # as loaded from a config.json that says so
    assert isinstance(tower.vision_tower(px), tuple)  # the model itself honours it ...
    assert torch.equal(tower(px), expected)  # ... and the tower asks for the output object anyway


@pytest.mark.parametrize("directory", ["clip_moe_dir", "dense_clip_dir"])
def test_the_tower_keeps_only_the_selected_hidden_state(directory, request):
    tower = CLIPMoEVisionTower(str(request.getfixturevalue(directory)), llava_args(-2))
    kept = []
    tower.vision_tower.register_forward_hook(lambda _model, _args, out: kept.append(out.hidden_states))
    tower(pixels(2))
    assert [i for i, h in enumerate(kept[0]) if h is not None] == [3]


@pytest.mark.parametrize("delay_load", [True, False])
def test_the_tower_offers_image_size_as_llava_next_reads_it(clip_moe_dir, delay_load):
    tower = CLIPMoEVisionTower(str(clip_moe_dir), llava_args(), delay_load=delay_load)
    assert tower.is_loaded is not delay_load
    assert tower.image_size == tower.config.image_size == 32
    assert tower.num_patches_per_side == tower.image_size // tower.config.patch_size


@pytest.mark.parametrize("directory", ["clip_moe_dir", "dense_clip_dir"])
@pytest.mark.parametrize("delay_load", [True, False])
def test_llavas_s2_multi_scale_tower_is_refused_not_built_single_scale(directory, delay_load, request):
    path = str(request.getfixturevalue(directory))
    with pytest.raises(UserError, match=r"^s2 is set .*s2_scales '32,64'.*set s2 to false") as err:
        CLIPMoEVisionTower(path, llava_args(s2=True, s2_scales="32,64"), delay_load=delay_load)
    assert "\n" not in str(err.value)
    assert CLIPMoEVisionTower(path, llava_args(s2=False, s2_scales="32,64")).hidden_size == 32
