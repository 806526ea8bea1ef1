"""The dense SigLIP -> SigLIP-MoE weight map: the expert layout, every dense key used, routers new, clear errors."""

import pytest
import torch
from transformers import SiglipVisionModel

from encoder.family import family_of
from encoder.siglip import (
    SiglipMoEModel,
    SiglipMoETextModel,
    SiglipMoEVisionModel,
    dense_to_moe_state_dict,
)
from encoder.siglip.weight_map import dense_key_of, moe_config_of, new_routers


def test_every_expert_copies_the_dense_mlp_and_every_other_tensor_is_kept(dense_siglip):
    config = moe_config_of(dense_siglip.config, vision_moe=dict(num_experts=3, moe_layers=[1], moe_head=True),
                           text_moe=dict(num_experts=2, top_k=1, moe_layers=[0, 3]))
    dense = dense_siglip.state_dict()
    moe = dense_to_moe_state_dict(dense, config, seed=7)
    assert set(moe) == set(SiglipMoEModel(config).state_dict())
    up = moe["vision_model.encoder.layers.1.mlp.experts.up_proj"]
    assert up.shape == (3, 64, 32)  # [E, h, d]: fc1's [h, d] per expert
    assert moe["vision_model.encoder.layers.1.mlp.experts.down_proj"].shape == (3, 32, 64)
    for e in range(3):
        assert torch.equal(up[e], dense["vision_model.encoder.layers.1.mlp.fc1.weight"])
        assert torch.equal(moe["vision_model.head.mlp.experts.down_proj_bias"][e], dense["vision_model.head.mlp.fc2.bias"])
    assert moe["text_model.encoder.layers.3.mlp.experts.up_proj_bias"].shape == (2, 64)
    upcycled = {dense_key_of(k) for k in moe if dense_key_of(k)}
    mlps = ["vision_model.encoder.layers.1.mlp.", "vision_model.head.mlp.", "text_model.encoder.layers.0.mlp.",
            "text_model.encoder.layers.3.mlp."]
    assert upcycled == {mlp + name for mlp in mlps for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
    for key, value in dense.items():
        if key not in upcycled:
            assert moe[key] is value, key
    routers = [k for k in moe if k.endswith("router.weight")]
    assert sorted(routers) == sorted(new_routers(config, seed=7))
    assert moe["vision_model.head.mlp.router.weight"].shape == (3, 32)
    assert not torch.equal(moe["vision_model.encoder.layers.1.mlp.router.weight"],
                           dense_to_moe_state_dict(dense, config, seed=8)["vision_model.encoder.layers.1.mlp.router.weight"])


def test_dense_key_of_maps_only_expert_stacks():
    assert dense_key_of("vision_model.encoder.layers.2.mlp.experts.down_proj") == "vision_model.encoder.layers.2.mlp.fc2.weight"
    assert dense_key_of("head.mlp.experts.up_proj_bias") == "head.mlp.fc1.bias"
    assert dense_key_of("vision_model.encoder.layers.2.mlp.router.weight") is None


def test_a_dense_model_of_another_kind_is_refused(dense_siglip):
    config = moe_config_of(dense_siglip.config, vision_moe=dict(moe_layers=[0]))
    with pytest.raises(ValueError, match="has no vision_model.encoder.layers.0.mlp.fc1.weight"):
        dense_to_moe_state_dict(dense_siglip.vision_model.state_dict(), config)


def test_the_family_layer_finds_siglip_and_its_classes_and_names(dense_siglip):
    config = moe_config_of(dense_siglip.config, vision_moe=dict(moe_layers=[2]), text_moe=dict(moe_layers=[0]))
    match = family_of(config)
    assert (match.family.name, match.is_moe, match.kind, match.label) == ("siglip", True, "model", "SigLIP-MoE")
    assert match.family.moe_models == {"model": SiglipMoEModel, "vision": SiglipMoEVisionModel,
                                       "text": SiglipMoETextModel}
    assert not match.family.has_cls_token and match.family.dense_vision_model is SiglipVisionModel
    dense_match = family_of(dense_siglip.config.vision_config)
    assert (dense_match.family.name, dense_match.is_moe, dense_match.kind) == ("siglip", False, "vision")
    # The family's weight map names exactly the keys this weight map fills.
    moe = dense_to_moe_state_dict(dense_siglip.state_dict(), config)
    weight_map = match.family.weight_map
    for tower, layer in (("vision", 2), ("text", 0)):
        assert weight_map.router_key(tower, layer) in moe
        for expert_key, dense_key in weight_map.expert_keys(tower, layer).items():
            assert dense_key_of(expert_key) == dense_key and moe[expert_key].shape[0] == 4
