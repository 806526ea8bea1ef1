"""The model-family layer: which family a directory or config is, dense or MoE, and what each family declares.

The layout promise is tested by a family made up here: registered in-process with one `register_family` call (its
configs and models subclass CLIP's, under model types no one else claims), it is found, validated, loaded and used
as a LLaVA tower by the family-agnostic code without any other change.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from huggingface_hub.dataclasses import strict
from transformers import AutoModel

from encoder import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    CLIPMoEVisionTower,
    is_clip_moe_dir,
    save_clip_moe,
)
from encoder import family as registry
from encoder.clip import CLIP
from encoder.clip.weight_map import WEIGHT_MAP
from encoder.convert.dense import default_image_processor
from encoder.family import (
    Family,
    UnknownFamily,
    family_named,
    family_of,
    find_family,
    is_full_moe,
    is_moe_dir,
    read_model_type,
    register_family,
)
from encoder.model_dir import clip_moe_config, load_clip_moe
from encoder.utils.errors import UserError


def test_clip_answers_for_each_of_its_model_types():
    for model_type, moe, kind in [("clip", False, "model"), ("clip_vision_model", False, "vision"),
                                  ("clip_text_model", False, "text"), ("clip_moe", True, "model"),
                                  ("clip_moe_vision_model", True, "vision"), ("clip_moe_text_model", True, "text")]:
        match = family_of({"model_type": model_type})
        assert (match.family, match.is_moe, match.kind, match.model_type) == (CLIP, moe, kind, model_type)
    assert family_of(CLIPMoEVisionConfig()).label == "CLIP-MoE"
    assert family_of({"model_type": "clip"}).label == "CLIP"
    assert family_named("clip") is CLIP


def test_clip_declares_its_classes_weight_map_and_tower_rules():
    assert CLIP.has_cls_token
    # the registered classes are the ones whose model_type the family claims, in KINDS order
    assert tuple(CLIP.moe_configs[k].model_type for k in registry.KINDS) == CLIP.moe_model_types
    assert {k: c.config_class for k, c in CLIP.moe_models.items()} == dict(CLIP.moe_configs)
    assert CLIP.moe_models["model"] is CLIPMoEModel and CLIP.moe_models["text"] is CLIPMoETextModel
    assert CLIP.weight_map is WEIGHT_MAP


def test_the_weight_map_names_the_keys_of_a_real_clip_moe(dense_clip):
    """Every name the map gives is a key of a CLIP-MoE built from the config, and every dense FFN key it maps from
    is a key of the dense CLIP: the map and the model cannot drift apart."""
    config = CLIPMoEConfig.from_clip_config(dense_clip.config, vision_moe=dict(moe_layers=[1, 3]),
                                            text_moe=dict(moe_layers=[0]))
    moe_keys = set(CLIPMoEModel(config).state_dict())
    dense_keys = set(dense_clip.state_dict())
    for tower, layer in [("vision", 1), ("vision", 3), ("text", 0)]:
        assert WEIGHT_MAP.router_key(tower, layer) in moe_keys
        for expert_key, dense_key in WEIGHT_MAP.expert_keys(tower, layer).items():
            assert expert_key in moe_keys and dense_key in dense_keys and dense_key not in moe_keys
            assert WEIGHT_MAP.dense_ffn_key(expert_key) == dense_key
    routers = WEIGHT_MAP.router_pattern("vision_model.")
    assert sorted(int(m[1]) for k in moe_keys if (m := routers.fullmatch(k))) == [1, 3]
    assert WEIGHT_MAP.router_pattern("").fullmatch("encoder.layers.7.mlp.router.weight")[1] == "7"
    assert WEIGHT_MAP.dense_ffn_key("text_model.encoder.layers.0.mlp.router.weight") is None


def test_directories_are_told_apart(clip_moe_dir, dense_clip_dir, tmp_path):
    assert is_moe_dir(clip_moe_dir) and is_full_moe(clip_moe_dir) and is_clip_moe_dir(clip_moe_dir)
    assert not is_moe_dir(dense_clip_dir) and not is_full_moe(dense_clip_dir)
    assert read_model_type(dense_clip_dir) == "clip" and read_model_type(tmp_path) is None
    assert not is_moe_dir(tmp_path / "missing") and not is_moe_dir(None)
    assert not is_moe_dir(clip_moe_dir / "config.json")  # a file, not a directory
    vision = CLIPMoEVisionModel(CLIPMoEVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=32, patch_size=8,
                                                    moe_layers=[1]))
    vision.save_pretrained(tmp_path / "vision")
    assert is_moe_dir(tmp_path / "vision") and not is_full_moe(tmp_path / "vision")  # a tower's export


def test_an_unknown_model_type_is_one_line_naming_it_and_the_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    with pytest.raises(UnknownFamily) as err:
        family_of(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in message
    assert "'llava_llama'" in message and str(tmp_path) in message
    assert all(f.name in message for f in registry.families()) and "clip" in message
    assert find_family(tmp_path) is None and not is_moe_dir(tmp_path)
    with pytest.raises(UnknownFamily, match="no model family 'nope'.*clip"):
        family_named("nope")


def test_a_model_type_belongs_to_one_family(monkeypatch):
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    with pytest.raises(ValueError, match="'clip_moe'.*family 'clip'"):
        register_family(Family(name="other", dense_model_types=("other",), moe_model_types=("clip_moe",),
                               has_cls_token=False))


# A made-up family: CLIP's modules under new model types, its tower without a CLS-token rule. Everything below uses
# only the registry to find its classes.

@strict
class ToyMoEVisionConfig(CLIPMoEVisionConfig):
    model_type = "toy_moe_vision_model"


@strict
class ToyMoETextConfig(CLIPMoETextConfig):
    model_type = "toy_moe_text_model"


@strict
class ToyMoEConfig(CLIPMoEConfig):
    model_type = "toy_moe"
    sub_configs_defaults = {"vision_config": ToyMoEVisionConfig, "text_config": ToyMoETextConfig}


class ToyMoEVisionModel(CLIPMoEVisionModel):
    config_class = ToyMoEVisionConfig


class ToyMoETextModel(CLIPMoETextModel):
    config_class = ToyMoETextConfig


class ToyMoEModel(CLIPMoEModel):
    config_class = ToyMoEConfig


@pytest.fixture
def toy_family(monkeypatch):
    """The made-up family, registered for one test (the registry restored afterwards)."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    return register_family(replace(
        CLIP, name="toy", display_name="Toy", has_cls_token=False,
        dense_model_types=("toy", "toy_vision_model", "toy_text_model"),
        moe_model_types=("toy_moe", "toy_moe_vision_model", "toy_moe_text_model"),
        moe_configs={"model": ToyMoEConfig, "vision": ToyMoEVisionConfig, "text": ToyMoETextConfig},
        moe_models={"model": ToyMoEModel, "vision": ToyMoEVisionModel, "text": ToyMoETextModel},
    ))


def test_a_family_registered_in_one_call_is_found_loaded_and_used_as_a_tower(toy_family, dense_clip, tmp_path):
    clip = CLIPMoEConfig.from_clip_config(dense_clip.config, vision_moe=dict(moe_layers=[1], num_experts=2, top_k=1))
    torch.manual_seed(0)
    toy = save_clip_moe(ToyMoEModel(ToyMoEConfig(**clip.to_dict())), tmp_path / "toy",
                        image_processor=default_image_processor(32))

    match = family_of(toy)
    assert (match.family, match.is_moe, match.kind, match.label) == (toy_family, True, "model", "Toy-MoE")
    assert is_moe_dir(toy) and is_full_moe(toy) and not is_clip_moe_dir(toy)
    assert type(clip_moe_config(toy)) is ToyMoEConfig
    model = load_clip_moe(toy)  # the family's full model, from the registry
    assert type(model) is ToyMoEModel
    assert type(AutoModel.from_pretrained(toy)) is ToyMoEModel  # register_family told transformers' Auto classes

    class Args:
        mm_vision_select_layer = -2
        mm_vision_select_feature = "patch"

    tower = CLIPMoEVisionTower(str(toy), Args())
    assert tower.family is toy_family and type(tower.vision_tower) is ToyMoEVisionModel
    # its weights, read from under the full directory's vision prefix (register_family told transformers so)
    loaded = tower.vision_tower.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.vision_model.state_dict().items())
    pixels = torch.randn(2, 3, 32, 32)
    # no CLS-token rule: 'patch' keeps every token (a CLIP tower drops token 0)
    assert tower(pixels).shape == (2, 1 + tower.num_patches, 32)
    tower.family = CLIP
    assert tower(pixels).shape == (2, tower.num_patches, 32)


def test_every_family_folder_is_registered_by_importing_encoder():
    """A family folder is one that calls `register_family` in its __init__; a fresh interpreter that imports only
    `encoder` knows each (no answer of family_of may depend on what a caller happened to import first)."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    folders = sorted(p.parent.name for p in (REPO_ROOT / "encoder").glob("*/__init__.py")
                     if "register_family(" in p.read_text())
    code = "import encoder; from encoder.family import families; print(' '.join(sorted(f.name for f in families())))"
    names = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert "clip" in folders and names.stdout.split() == folders


def test_every_family_declares_its_dense_classes_and_upcycles_its_dense_config():
    """What the family-agnostic dense loading and recipes read: transformers' dense classes per kind (the classes
    `family_of` answers for their model types) and the dense -> MoE config map, judged by the MoE config class."""
    from transformers import CLIPConfig, SiglipConfig

    from encoder.upcycling import moe_config_from_dense

    for name, dense_config in (("clip", CLIPConfig()), ("siglip", SiglipConfig())):
        family = registry.family_named(name)
        for kind, model_type in zip(registry.KINDS, family.dense_model_types):
            assert family.dense_configs[kind].model_type == model_type
            assert family.dense_models[kind].config_class is family.dense_configs[kind]
        moe = moe_config_from_dense(dense_config, vision_moe={"num_experts": 2, "top_k": 1, "moe_layers": [1]})
        assert type(moe) is family.moe_configs["model"]
        assert moe.vision_config.moe_layers == [1] and moe.text_config.moe_layers == []
        assert moe.vision_config.hidden_size == dense_config.vision_config.hidden_size
        with pytest.raises(ValueError, match="already a"):
            moe_config_from_dense(moe)


def test_the_weight_map_names_the_siglip_head_mlp_only_when_moe_head_is_set():
    from transformers import SiglipConfig

    from encoder.upcycling import moe_config_from_dense, moe_mlps, new_routers

    dense = SiglipConfig(vision_config={"num_hidden_layers": 3}, text_config={"num_hidden_layers": 2})
    weight_map = registry.family_named("siglip").weight_map
    for moe_head in (False, True):
        config = moe_config_from_dense(dense, vision_moe={"moe_layers": [0, 2], "moe_head": moe_head},
                                       text_moe={"moe_layers": [1]})
        expected = ["vision_model.encoder.layers.0.mlp.", "vision_model.encoder.layers.2.mlp."]
        expected += ["vision_model.head.mlp."] * moe_head + ["text_model.encoder.layers.1.mlp."]
        assert [mlp for _, _, mlp in moe_mlps(config)] == expected
        assert sorted(new_routers(config)) == sorted(mlp + "router.weight" for mlp in expected)
        assert weight_map.moe_mlps("vision", config.vision_config, "") == [m[len("vision_model."):]
                                                                         for m in expected if "vision" in m]
    with pytest.raises(ValueError, match="no pooling-head MLP"):
        CLIP.weight_map.moe_mlps("vision", type("Tower", (), {"moe_layers": [], "moe_head": True})())


def test_clip_routers_are_drawn_as_they_always_were(dense_clip):
    """N(0, initializer_range) per tower (seed for vision, seed + 1 for text), layer by layer: the saved CLIP-MoE's
    routers (and so its bytes) do not depend on the mechanism being shared with SigLIP."""
    from encoder.upcycling import new_routers

    config = CLIPMoEConfig.from_clip_config(dense_clip.config, vision_moe={"moe_layers": [1, 3]},
                                            text_moe={"moe_layers": [0]})
    routers = new_routers(config, seed=4)
    for seed, tower, layers in ((4, "vision", [1, 3]), (5, "text", [0])):
        cfg = getattr(config, f"{tower}_config")
        gen = torch.Generator().manual_seed(seed)
        for layer in layers:
            expected = torch.empty(cfg.num_experts, cfg.hidden_size).normal_(0.0, cfg.initializer_range, generator=gen)
            assert torch.equal(routers[f"{tower}_model.encoder.layers.{layer}.mlp.router.weight"], expected)
