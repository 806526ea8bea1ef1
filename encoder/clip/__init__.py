"""The CLIP family: CLIP-MoE configs and models (transformers' CLIP conventions), the dense<->MoE weight map, and
the tower rules; registered with `encoder.family` and with transformers' Auto classes on import.

Registering with `AutoConfig` / `AutoModel` makes `from_pretrained(DIR)` of a saved CLIP-MoE directory return our
classes; `register_family` lets the family-agnostic code (loading, model directories, the LLaVA tower, the recipes)
find them from a directory's `model_type`.
"""

from transformers import AutoConfig, AutoModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from ..family import Family, find_family, is_moe_dir, register_family
from .configuration import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .modeling import CLIPMoEModel, CLIPMoEPreTrainedModel, CLIPMoETextModel, CLIPMoEVisionModel
from .weight_map import TOWER_PREFIX, WEIGHT_MAP

for _config, _model in (
    (CLIPMoEConfig, CLIPMoEModel),
    (CLIPMoEVisionConfig, CLIPMoEVisionModel),
    (CLIPMoETextConfig, CLIPMoETextModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

# A tower loaded from a full CLIP-MoE directory takes its weights from under that tower's prefix,
# as transformers does for CLIPVisionModel / CLIPTextModel.
for _model, _tower in ((CLIPMoEVisionModel, "vision"), (CLIPMoETextModel, "text")):
    register_checkpoint_conversion_mapping(_model.__name__, [PrefixChange(prefix_to_remove=TOWER_PREFIX[_tower])],
                                           overwrite=True)

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
