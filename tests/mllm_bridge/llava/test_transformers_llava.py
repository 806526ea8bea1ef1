"""transformers' own Llava family (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
`LlavaOnevisionForConditionalGeneration`) with a CLIP-MoE vision config (through Auto registration)."""

import pytest
import torch
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel
from mllm_bridge.embedded.tiny_lm import tiny_llama_config


def test_llava_for_conditional_generation_with_a_clip_moe(clip_moe_dir, llama_tokenizer, tmp_path):
    text = tiny_llama_config(llama_tokenizer, hidden_size=32)
    image_token = text.vocab_size  # one extra id for <image>
    text.vocab_size += 1
    config = LlavaConfig(vision_config=CLIPMoEVisionConfig.from_pretrained(clip_moe_dir), text_config=text,
                         image_token_id=image_token, image_seq_length=16, vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    tower = CLIPMoEVisionModel.from_pretrained(clip_moe_dir).eval()
    assert type(model.model.vision_tower) is CLIPMoEVisionModel
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)

    px = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1] + [image_token] * 16 + [5, 6, 7]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px).pooler_output
        expected = tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert torch.equal(torch.cat(list(features)), model.model.multi_modal_projector(expected)[0])
        logits = model(input_ids=ids, pixel_values=px).logits

    model.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(loaded.config.vision_config) is CLIPMoEVisionConfig
    assert loaded.config.vision_config.moe_layers == [0, 1, 2, 3]
    assert type(loaded.model.vision_tower) is CLIPMoEVisionModel
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=px).logits, logits)
    out = loaded.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)


FAMILIES = {
    "next": (LlavaNextConfig, LlavaNextForConditionalGeneration),
    "onevision": (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration),
}
PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width), multiples of the tiny tower's 32-pixel crops
IMAGE_SIZES = [[40, 70], [64, 30]]  # (height, width): one cut into 2x2 crops, a tall one into 2x1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [-2, [0, -1]])
def test_llava_next_and_onevision_with_a_clip_moe(clip_moe_dir, llama_tokenizer, tmp_path, family, layer):
    """Anyres crops go through our tower exactly as through the tower alone; a list of layers is their
    hidden states concatenated; the model generates and survives save/load.

    Strategy 'default' (drop CLS) only: with 'full', transformers' anyres packing cannot lay a CLS tower's
    1 + N tokens out as a grid, and fails the same way for its own dense CLIPVisionModel."""
    config_class, model_class = FAMILIES[family]
    text = tiny_llama_config(llama_tokenizer, hidden_size=32)
    image_token = text.vocab_size
    text.vocab_size += 1
    config = config_class(vision_config=CLIPMoEVisionConfig.from_pretrained(clip_moe_dir), text_config=text,
                          image_token_index=image_token, image_grid_pinpoints=PINPOINTS, vision_feature_layer=layer,
                          vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = model_class(config).eval()
    assert type(model.model.vision_tower) is CLIPMoEVisionModel
    tower = CLIPMoEVisionModel.from_pretrained(clip_moe_dir).eval()
    model.model.vision_tower.load_state_dict(tower.state_dict(), strict=True)

    sizes = torch.tensor(IMAGE_SIZES)
    crops = [image_size_to_num_patches(size, PINPOINTS, 32) for size in IMAGE_SIZES]
    assert crops == [5, 3]  # the global view and the crops
    px = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # padded to 5 views, as processors do
    projected = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, args, _out: projected.append(args[0]))
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output
        states = tower(torch.cat([px[0], px[1, :3]]), output_hidden_states=True).hidden_states
    layers = [layer] if isinstance(layer, int) else layer
    expected = torch.cat([states[i] for i in layers], dim=-1)
    assert expected.shape == (8, 17, 32 * len(layers))
    assert torch.equal(projected[0], expected[:, 1:])

    tokens = features[0].shape[0]
    ids = torch.tensor([[1] + [image_token] * tokens + [5, 6, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px[:1], image_sizes=sizes[:1]).logits
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    assert type(loaded.config.vision_config) is CLIPMoEVisionConfig and type(loaded.model.vision_tower) is CLIPMoEVisionModel
    assert loaded.config.vision_feature_layer == layer
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, pixel_values=px[:1], image_sizes=sizes[:1]).logits, logits)
    out = loaded.generate(input_ids=ids, pixel_values=px[:1], image_sizes=sizes[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) and torch.equal(out[:, : ids.shape[1]], ids)
