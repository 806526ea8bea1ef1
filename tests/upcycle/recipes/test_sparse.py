"""Sparse upcycling: exact function preservation, expert copies, seeded routers, layer specs."""

import pytest
import torch
from conftest import tiny_dense_clip, tiny_open_clip

from encoder.utils.errors import UserError
from upcycle import resolve_moe_layers, sparse_upcycle
from upcycle.eval.function_check import max_output_diff

TOWERS = [("vision",), ("text",), ("vision", "text")]


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("layers", ["all", "even", "last:2"])
@pytest.mark.parametrize("towers", TOWERS, ids=["vision", "text", "both"])
def test_upcycled_model_reproduces_the_dense_model(dense_clip, batch, top_k, layers, towers):
    moe = sparse_upcycle(dense_clip, num_experts=4, top_k=top_k, moe_layers=layers, towers=towers, seed=7)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    diff = max_output_diff(dense_clip, moe, inputs)
    assert max(diff.values()) <= 1e-5, diff


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_activation_is_kept(act, batch):
    dense = tiny_dense_clip(hidden_act=act)
    moe = sparse_upcycle(dense)
    assert moe.config.vision_config.hidden_act == act
    assert max(max_output_diff(dense, moe, batch).values()) <= 1e-5


def test_experts_are_exact_copies_and_everything_else_is_copied(dense_clip):
    moe = sparse_upcycle(dense_clip, num_experts=3, moe_layers=[1, 3], towers=("vision",))
    sd, dense = moe.state_dict(), dense_clip.state_dict()
    for layer in (1, 3):
        p = f"vision_model.encoder.layers.{layer}.mlp."
        for e in range(3):
            assert torch.equal(sd[p + "experts.up_proj"][e], dense[p + "fc1.weight"])
            assert torch.equal(sd[p + "experts.up_proj_bias"][e], dense[p + "fc1.bias"])
            assert torch.equal(sd[p + "experts.down_proj"][e], dense[p + "fc2.weight"])
            assert torch.equal(sd[p + "experts.down_proj_bias"][e], dense[p + "fc2.bias"])
    for key, value in dense.items():
        if key in sd:
            assert torch.equal(sd[key], value), key
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in sd  # text tower stays dense


def test_routers_are_seeded(dense_clip):
    key = "vision_model.encoder.layers.0.mlp.router.weight"
    a, b = sparse_upcycle(dense_clip, seed=1), sparse_upcycle(dense_clip, seed=1)
    c = sparse_upcycle(dense_clip, seed=2)
    assert torch.equal(a.state_dict()[key], b.state_dict()[key])
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert a.state_dict()[key].abs().sum() > 0


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 3, 4, 5]), ("even", [0, 2, 4]), ("odd", [1, 3, 5]), ("last:2", [4, 5]),
     ("none", []), ("3,1", [1, 3]), ([5, 0], [0, 5])],
)
def test_moe_layer_specs(spec, expected):
    assert resolve_moe_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["7", "last:0", "last:9", "every", "-1"])
def test_bad_moe_layer_specs_are_user_errors(spec):
    with pytest.raises(UserError):
        resolve_moe_layers(spec, 6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=2, top_k=3), "top_k"),
    (dict(towers=("audio",)), "towers"),
])
def test_bad_arguments_are_user_errors(dense_clip, kwargs, message):
    with pytest.raises(UserError, match=message):
        sparse_upcycle(dense_clip, **kwargs)


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
def test_upcycling_an_open_clip_model_reproduces_open_clip(tmp_path, quick_gelu):


    name = f"test-upcycle-occ-{int(quick_gelu)}"
    oc = tiny_open_clip(tmp_path, name, quick_gelu)
    ckpt = tmp_path / "weights.pt"
    torch.save(oc.state_dict(), ckpt)

    moe = sparse_upcycle(f"open_clip:{name}:{ckpt}", num_experts=4, top_k=2, moe_layers="all")
    assert moe.config.vision_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[:, 0], ids[0, 1:4], ids[0, 4], ids[1, 1:10], ids[1, 10] = 49406, 320, 49407, 500, 49407
    with torch.no_grad():
        image = moe.get_image_features(pixels).pooler_output
        text = moe.get_text_features(ids).pooler_output
        torch.testing.assert_close(image, oc.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(text, oc.encode_text(ids), atol=1e-5, rtol=0)


def test_config_and_routers_are_the_same_from_a_model_or_its_config(dense_clip):
    """The streaming path sees only the base's config; it must build the same CLIP-MoE config and routers."""
    from upcycle import moe_config_for
    from encoder.clip.weight_map import WEIGHT_MAP
    from upcycle.recipes.assemble import new_routers

    from_model = moe_config_for(dense_clip, 4, 2, "odd", ("vision", "text"))
    from_config = moe_config_for(dense_clip.config, 4, 2, "odd", ("vision", "text"))
    assert from_model.to_dict() == from_config.to_dict()
    moe = sparse_upcycle(dense_clip, 4, 2, "odd", seed=3)
    routers = new_routers(from_config, seed=3)
    assert sorted(routers) == sorted(k for k in moe.state_dict() if k.endswith("router.weight"))
    for key, value in routers.items():
        assert torch.equal(moe.state_dict()[key], value), key
    assert WEIGHT_MAP.dense_ffn_key("text_model.encoder.layers.3.mlp.experts.down_proj_bias") == \
        "text_model.encoder.layers.3.mlp.fc2.bias"
    assert WEIGHT_MAP.dense_ffn_key("text_model.encoder.layers.3.mlp.router.weight") is None
