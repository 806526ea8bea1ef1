"""A LLaVA (llava-torch) model around a vision tower, assembled the way LLaVA's stage-1 training assembles it.

LLaVA's own `initialize_vision_modules` builds the tower (ours for a CLIP-MoE or SigLIP(-MoE) directory, through the
hook), records `mm_vision_tower`, `mm_hidden_size`, the select layer/feature and the projector type in
the config, and creates a fresh projector. The result saves with `save_pretrained` into a directory that
`llava.model.builder.load_pretrained_model` loads (name the directory with 'llava' in it).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch
from transformers import LlamaConfig

from .hook import install_llava_hook


def build_llava_model(
    language_model: LlamaConfig | str | os.PathLike,
    vision_tower: str | os.PathLike,
    select_layer: int = -2,
    select_feature: str = "patch",
    projector_type: str = "mlp2x_gelu",
    dtype: torch.dtype | None = None,
    cache_dir: str | None = None,
    patch_merge_type: str = "flat",
):
    """A `LlavaLlamaForCausalLM`: a new (from a config) or saved Llama, `vision_tower`, a new projector.

    Image tokens are plain `<image>` placeholders (`mm_use_im_start_end` / `mm_use_im_patch_token` off),
    as in LLaVA-1.5. `dtype` applies to the language model only (None: the saved dtype, or float32 for a
    config); the tower and the new projector start in float32. `cache_dir`: where hub ids are cached.
    """
    install_llava_hook()  # before llava is imported, in case the start-up hook is switched off
    from llava.model.language_model.llava_llama import (
        LlavaConfig,
        LlavaLlamaForCausalLM,
    )

    if isinstance(language_model, LlamaConfig):
        model = LlavaLlamaForCausalLM(LlavaConfig(**language_model.to_dict())).to(dtype)
    else:
        model = LlavaLlamaForCausalLM.from_pretrained(language_model, dtype=dtype, cache_dir=cache_dir)
    model_args = SimpleNamespace(
        vision_tower=str(vision_tower),
        mm_vision_select_layer=select_layer,
        mm_vision_select_feature=select_feature,
        mm_projector_type=projector_type,
        mm_patch_merge_type=patch_merge_type,
        pretrain_mm_mlp_adapter=None,
    )
    model.get_model().initialize_vision_modules(model_args)
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    return model
