"""The SigLIP2 family: SigLIP2-MoE configs, models (naflex vision inputs) and the dense -> MoE weight map.

Importing this package registers the SigLIP2-MoE configs and models with transformers' Auto classes and the family
with `encoder.family`, as `encoder.siglip` does for SigLIP.
"""

from transformers import (
    Siglip2Config,
    Siglip2ImageProcessor,
    Siglip2Model,
    Siglip2TextConfig,
    Siglip2TextModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)

from ..family import Family, register_family
from ..siglip.weight_map import WEIGHT_MAP
from .configuration import (
    Siglip2MoEConfig,
    Siglip2MoETextConfig,
    Siglip2MoEVisionConfig,
)
from .modeling import (
    NaflexInputError,
    Siglip2MoEModel,
    Siglip2MoEPreTrainedModel,
    Siglip2MoETextModel,
    Siglip2MoEVisionModel,
)
from .outputs import Siglip2MoEOutput
from .weight_map import moe_config_of, sparse_upcycle_siglip2

SIGLIP2 = register_family(Family(
    name="siglip2",
    display_name="SigLIP2",
    dense_model_types=("siglip2", "siglip2_vision_model", "siglip2_text_model"),
    moe_model_types=(Siglip2MoEConfig.model_type, Siglip2MoEVisionConfig.model_type,
                     Siglip2MoETextConfig.model_type),
    has_cls_token=False,
    moe_configs={"model": Siglip2MoEConfig, "vision": Siglip2MoEVisionConfig, "text": Siglip2MoETextConfig},
    moe_models={"model": Siglip2MoEModel, "vision": Siglip2MoEVisionModel, "text": Siglip2MoETextModel},
    weight_map=WEIGHT_MAP,  # SigLIP's: the same state-dict names
    dense_vision_config=Siglip2VisionConfig,
    dense_vision_model=Siglip2VisionModel,
    image_processor=Siglip2ImageProcessor,
    dense_configs={"model": Siglip2Config, "vision": Siglip2VisionConfig, "text": Siglip2TextConfig},
    dense_models={"model": Siglip2Model, "vision": Siglip2VisionModel, "text": Siglip2TextModel},
    moe_config_from_dense=moe_config_of,
    sigmoid_loss=True,
    patch_sequences=True,
))

__all__ = [
    "SIGLIP2",
    "NaflexInputError",
    "Siglip2MoEConfig",
    "Siglip2MoEModel",
    "Siglip2MoEOutput",
    "Siglip2MoEPreTrainedModel",
    "Siglip2MoETextConfig",
    "Siglip2MoETextModel",
    "Siglip2MoEVisionConfig",
    "Siglip2MoEVisionModel",
    "sparse_upcycle_siglip2",
]
