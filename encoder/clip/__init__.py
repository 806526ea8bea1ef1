"""The CLIP family: CLIP-MoE configs and models (transformers' CLIP conventions), the dense<->MoE weight map, and
the tower rules; registered on import.

`register_family` lets the family-agnostic code (loading, model directories, the LLaVA tower, the recipes) find the
classes from a directory's `model_type`, and registers them with transformers' Auto classes, so
`AutoModel.from_pretrained(DIR)` of a saved CLIP-MoE directory returns a `CLIPMoEModel`.
"""

from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from ..family import Family, find_family, is_moe_dir, register_family
from .configuration import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .modeling import (
    CLIPMoEModel,
    CLIPMoEPreTrainedModel,
    CLIPMoETextModel,
    CLIPMoEVisionModel,
)
from .weight_map import WEIGHT_MAP, moe_config_of

CLIP = register_family(Family(
    name="clip",
    display_name="CLIP",
    dense_model_types=("clip", "clip_vision_model", "clip_text_model"),
    moe_model_types=(CLIPMoEConfig.model_type, CLIPMoEVisionConfig.model_type, CLIPMoETextConfig.model_type),
    has_cls_token=True,  # [CLS] + patches: LLaVA's "patch" select drops token 0
    moe_configs={"model": CLIPMoEConfig, "vision": CLIPMoEVisionConfig, "text": CLIPMoETextConfig},
    moe_models={"model": CLIPMoEModel, "vision": CLIPMoEVisionModel, "text": CLIPMoETextModel},
    weight_map=WEIGHT_MAP,
    dense_vision_config=CLIPVisionConfig,
    dense_vision_model=CLIPVisionModel,
    image_processor=CLIPImageProcessor,
    dense_configs={"model": CLIPConfig, "vision": CLIPVisionConfig, "text": CLIPTextConfig},
    dense_models={"model": CLIPModel, "vision": CLIPVisionModel, "text": CLIPTextModel},
    moe_config_from_dense=moe_config_of,
))



def is_clip_moe_dir(path) -> bool:
    """True when `path` is a local directory holding a CLIP-MoE (full model or a tower's export).

    Kept for `from encoder import is_clip_moe_dir` (public since the first release); family-agnostic code asks
    `encoder.family.is_moe_dir` (a MoE of any family) or `family_of`."""
    return is_moe_dir(path) and find_family(path).family is CLIP


__all__ = [
    "CLIP",
    "CLIPMoEConfig",
    "CLIPMoEModel",
    "CLIPMoEPreTrainedModel",
    "CLIPMoETextConfig",
    "CLIPMoETextModel",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
    "is_clip_moe_dir",
]
