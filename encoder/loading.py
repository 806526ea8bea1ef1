"""Loading any CLIP a command may be given (dense or CLIP-MoE) together with what preprocesses its inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from .dense import image_processor_for, load_dense_clip, tokenizer_for
from .model_dir import load_clip_moe, read_config_json


@dataclass
class LoadedCLIP:
    """A CLIPModel or CLIPMoEModel (eval mode, CPU), its image processor and tokenizer (None if it has none)."""

    model: PreTrainedModel
    image_processor: object
    tokenizer: object | None
    source: str

    @property
    def is_moe(self) -> bool:
        return getattr(self.model.config, "model_type", "") == "clip_moe"


def model_type_of(path: str | Path) -> str | None:
    """The `model_type` in DIR/config.json, or None when `path` is not a model directory."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return read_config_json(path).get("model_type")


def load_clip(spec: str | Path) -> LoadedCLIP:
    """A dense CLIP (directory, hub id, open_clip:NAME) or a CLIP-MoE directory, validated (`encoder.model_dir`):
    a directory whose config, weights, image processor or tokenizer is damaged is a UserError, never a model."""
    if model_type_of(spec) == "clip_moe":
        from .modeling import CLIPMoEModel

        path = Path(spec)
        model = load_clip_moe(path, CLIPMoEModel).eval()
        return LoadedCLIP(model, image_processor_for(path, model.config), tokenizer_for(path), str(spec))
    dense = load_dense_clip(str(spec))
    return LoadedCLIP(dense.model, dense.image_processor, dense.tokenizer, dense.source)

