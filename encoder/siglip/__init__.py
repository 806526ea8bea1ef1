"""The SigLIP family: SigLIP-MoE configs, models and the dense -> MoE weight map.

Importing this package registers the SigLIP-MoE configs and models with transformers' Auto classes (so
`AutoConfig` / `AutoModel.from_pretrained(DIR)` return our classes for a saved SigLIP-MoE directory) and the family
with `encoder.family` (so `family_of(DIR)` knows dense SigLIP and SigLIP-MoE directories).
"""

from transformers import (
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ..family import Family, register_family
from .configuration import SiglipMoEConfig, SiglipMoETextConfig, SiglipMoEVisionConfig
from .modeling import (
    SiglipMoEModel,
    SiglipMoEPreTrainedModel,
    SiglipMoETextModel,
    SiglipMoEVisionModel,
    sigmoid_loss,
)
from .outputs import SiglipMoEOutput, SiglipMoEOutputWithPooling
from .weight_map import (
    WEIGHT_MAP,
    dense_to_moe_state_dict,
    moe_config_of,
    sparse_upcycle_siglip,
)

SIGLIP = register_family(Family(
    name="siglip",
    display_name="SigLIP",
    dense_model_types=("siglip", "siglip_vision_model", "siglip_text_model"),
    moe_model_types=(SiglipMoEConfig.model_type, SiglipMoEVisionConfig.model_type, SiglipMoETextConfig.model_type),
    has_cls_token=False,  # patches only: LLaVA keeps every token (as LLaVA-NeXT's SigLIP tower does)
    moe_configs={"model": SiglipMoEConfig, "vision": SiglipMoEVisionConfig, "text": SiglipMoETextConfig},
    moe_models={"model": SiglipMoEModel, "vision": SiglipMoEVisionModel, "text": SiglipMoETextModel},
    weight_map=WEIGHT_MAP,
    dense_vision_config=SiglipVisionConfig,
    dense_vision_model=SiglipVisionModel,
    image_processor=SiglipImageProcessor,
    dense_configs={"model": SiglipConfig, "vision": SiglipVisionConfig, "text": SiglipTextConfig},
    dense_models={"model": SiglipModel, "vision": SiglipVisionModel, "text": SiglipTextModel},
    moe_config_from_dense=moe_config_of,
    sigmoid_loss=True,
))

__all__ = [
    "SIGLIP",
    "SiglipMoEConfig",
    "SiglipMoEModel",
    "SiglipMoEOutput",
    "SiglipMoEOutputWithPooling",
    "SiglipMoEPreTrainedModel",
    "SiglipMoETextConfig",
    "SiglipMoETextModel",
    "SiglipMoEVisionConfig",
    "SiglipMoEVisionModel",
    "dense_to_moe_state_dict",
    "moe_config_of",
    "sigmoid_loss",
    "sparse_upcycle_siglip",
]
