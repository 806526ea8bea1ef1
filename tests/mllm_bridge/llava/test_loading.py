"""LLaVA's own loading paths build a CLIP-MoE tower whose features are the CLIP-MoE's, not the dense base's."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import CLIPVisionModel

from encoder import CLIPMoEVisionConfig, CLIPMoEVisionModel, CLIPMoEVisionTower
from mllm_bridge.embedded.tiny_lm import tiny_llama_config
from mllm_bridge.llava.model import build_llava_model

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"


def penultimate_patches(model, px: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(px, output_hidden_states=True).hidden_states[-2][:, 1:]


def test_initialize_vision_modules_builds_our_tower(clip_moe_dir, llama_tokenizer):
    model = build_llava_model(tiny_llama_config(llama_tokenizer, hidden_size=32), clip_moe_dir)
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and tower.is_loaded
    assert model.config.mm_hidden_size == 32 and model.config.mm_vision_tower == str(clip_moe_dir)


def test_from_pretrained_builds_our_tower_with_delayed_loading(llava_moe_dir):
    from llava.model import LlavaLlamaForCausalLM

    saved = json.loads((llava_moe_dir / "config.json").read_text())
    assert saved["mm_projector_type"] == "mlp2x_gelu" and saved["mm_vision_select_layer"] == -2
    model = LlavaLlamaForCausalLM.from_pretrained(llava_moe_dir)
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and not tower.is_loaded
    assert type(tower.config) is CLIPMoEVisionConfig


def test_load_pretrained_model_runs_a_clip_moe_llava(llava_moe_dir, clip_moe_dir, dense_clip_dir):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(
        str(llava_moe_dir), None, llava_moe_dir.name, device_map="cpu", device="cpu")
    tower = model.get_vision_tower()
    assert type(tower) is CLIPMoEVisionTower and tower.is_loaded and processor is tower.image_processor
    assert tower.dtype == model.dtype == torch.float16  # LLaVA's loader casts the tower to fp16

    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).half()
    features = tower(px)
    expected = penultimate_patches(CLIPMoEVisionModel.from_pretrained(clip_moe_dir).half().eval(), px)
    dense = penultimate_patches(CLIPVisionModel.from_pretrained(dense_clip_dir).half().eval(), px)
    assert torch.equal(features, expected)
    assert not torch.allclose(features, dense, atol=1e-2)

    ids = tokenizer_image_token(PROMPT, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    with torch.no_grad():
        logits = model(input_ids=ids, images=px[:1]).logits
    assert logits.shape == (1, ids.shape[1] - 1 + tower.num_patches, len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(ids, images=px[:1], image_sizes=[(32, 32)], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 3)


@pytest.mark.slow
def test_lmms_evals_llava_model_builds_our_tower(llava_moe_dir):
    # A fresh interpreter, as `python -m lmms_eval --model llava` runs: the start-up hook alone must suffice,
    # and lmms-eval's Accelerator state stays out of this test process.
    code = (
        "from lmms_eval.models.simple.llava import Llava\n"
        f"lmm = Llava(pretrained={str(llava_moe_dir)!r}, device='cpu', device_map='auto')\n"
        "print(type(lmm.model.get_vision_tower()).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "CLIPMoEVisionTower"
