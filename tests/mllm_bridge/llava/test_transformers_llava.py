"""transformers' own `LlavaForConditionalGeneration` with a CLIP-MoE vision config (through Auto registration)."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

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
