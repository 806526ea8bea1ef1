"""Saving a CLIP-MoE directory: config, safetensors, image processor, tokenizer, model card and recipe.

Written atomically (see `encoder.utils.files.atomic_output_dir`): a failed save leaves nothing where a user or
LLaVA would load it.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPImageProcessor, PreTrainedModel

from .model_card import model_card
from .utils.files import atomic_output_dir


def save_clip_moe(
    model: PreTrainedModel,
    out: str | Path,
    image_processor: CLIPImageProcessor | None = None,
    tokenizer=None,
    card: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save `model` (safetensors + config), its image processor and tokenizer, and a model card, atomically."""
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        write_model_extras(tmp, model, image_processor, tokenizer, card)
    return Path(out)


def write_model_extras(
    directory: Path,
    model: PreTrainedModel,
    image_processor: CLIPImageProcessor | None = None,
    tokenizer=None,
    card: dict | None = None,
) -> None:
    """Everything of a CLIP-MoE directory but config and weights: image processor, tokenizer, model card and
    recipe. Shared by `save_clip_moe` and the streaming writers (which write the weights themselves); `model`
    may have meta-device parameters, it is only counted."""
    if image_processor is not None:
        image_processor.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / "README.md").write_text(model_card(model, card or {}))
    (directory / "clip_moe_recipe.json").write_text(json.dumps(card or {}, indent=2, default=str) + "\n")
