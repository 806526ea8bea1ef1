"""transformers' own `LlavaForConditionalGeneration` and `LlavaOnevisionForConditionalGeneration` with a SigLIP-MoE
vision config (built by `AutoModel.from_config`, since `encoder` registers the SigLIP-MoE classes): the features they
project are the LLaVA tower's own (every patch token, no CLS), and they generate and survive save/load."""

from types import SimpleNamespace

import pytest
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from encoder import CLIPMoEVisionTower
from encoder.siglip import SiglipMoEVisionConfig, SiglipMoEVisionModel
from mllm_bridge.embedded.tiny_lm import tiny_llama_config

PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width), multiples of the tiny tower's 32-pixel crops
IMAGE_SIZES = [[40, 70], [64, 30]]  # (height, width): one cut into 2x2 crops, a tall one into 2x1


def text_config(llama_tokenizer):
    text = tiny_llama_config(llama_tokenizer, hidden_size=32)
    image_token = text.vocab_size  # one extra id for <image>
    text.vocab_size += 1
    return text, image_token


def llava_tower(directory, layer: int) -> CLIPMoEVisionTower:
    """The LLaVA tower over the same directory: the judge of what transformers' Llava models project."""
    return CLIPMoEVisionTower(str(directory), SimpleNamespace(mm_vision_select_layer=layer,
                                                              mm_vision_select_feature="patch"))


def with_the_towers_weights(model, directory) -> SiglipMoEVisionModel:
    assert type(model.model.vision_tower) is SiglipMoEVisionModel
    tower = SiglipMoEVisionModel.from_pretrained(directory).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)
    return tower


def generates_after_save_and_load(model, model_class, tmp_path, inputs, layer):
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert type(loaded.config.vision_config) is SiglipMoEVisionConfig
    assert type(loaded.model.vision_tower) is SiglipMoEVisionModel
    assert loaded.config.vision_config.moe_layers == [0, 1, 2] and loaded.config.vision_feature_layer == layer
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, logits)
    ids = inputs["input_ids"]
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)


@pytest.mark.parametrize("layer", [-2, -1])
def test_llava_for_conditional_generation_with_a_siglip_moe(siglip_moe_dir, llama_tokenizer, tmp_path, layer):
    text, image_token = text_config(llama_tokenizer)
    config = LlavaConfig(vision_config=SiglipMoEVisionConfig.from_pretrained(siglip_moe_dir), text_config=text,
                         image_token_id=image_token, image_seq_length=16, vision_feature_layer=layer,
                         vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    tower = with_the_towers_weights(model, siglip_moe_dir)

    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px).pooler_output
        ours = llava_tower(siglip_moe_dir, layer)(px)
        assert ours.shape == (2, 16, 32)  # every patch token: SigLIP has no CLS token to drop
        assert torch.equal(ours, tower(px, output_hidden_states=True).hidden_states[layer])
        torch.testing.assert_close(torch.stack(list(features)), model.model.multi_modal_projector(ours),
                                   atol=1e-6, rtol=1e-6)
    ids = torch.tensor([[1] + [image_token] * 16 + [5, 6, 7]])
    generates_after_save_and_load(model, LlavaForConditionalGeneration, tmp_path,
                                  dict(input_ids=ids, pixel_values=px[:1]), layer)


def test_llava_onevision_with_a_siglip_moe(siglip_moe_dir, llama_tokenizer, tmp_path):
    """OneVision's own setting for a SigLIP (strategy 'full', last layer): anyres crops go through the model's tower
    exactly as through the LLaVA tower alone."""
    text, image_token = text_config(llama_tokenizer)
    config = LlavaOnevisionConfig(vision_config=SiglipMoEVisionConfig.from_pretrained(siglip_moe_dir), text_config=text,
                                  image_token_index=image_token, image_grid_pinpoints=PINPOINTS,
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    with_the_towers_weights(model, siglip_moe_dir)

    sizes = torch.tensor(IMAGE_SIZES)
    assert [image_size_to_num_patches(size, PINPOINTS, 32) for size in IMAGE_SIZES] == [5, 3]
    px = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # padded to 5 views, as processors do
    projected = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, args, _out: projected.append(args[0]))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
        ours = llava_tower(siglip_moe_dir, -1)(torch.cat([px[0], px[1, :3]]))
    assert ours.shape == (8, 16, 32)
    assert torch.equal(projected[0], ours)

    ids = torch.tensor([[1] + [image_token] * features[0].shape[0] + [5, 6, 7]])
    generates_after_save_and_load(model, LlavaOnevisionForConditionalGeneration, tmp_path,
                                  dict(input_ids=ids, pixel_values=px[:1], image_sizes=sizes[:1]), -1)
