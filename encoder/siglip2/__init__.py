"""The SigLIP2 family: SigLIP2-MoE configs, models (naflex vision inputs) and the dense -> MoE weight map.

Importing this package registers the SigLIP2-MoE configs and models with transformers' Auto classes and the family
with `encoder.family`, as `encoder.siglip` does for SigLIP.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    Siglip2ImageProcessor,
    Siglip2VisionConfig,
    Siglip2VisionModel,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

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
from .weight_map import sparse_upcycle_siglip2

for _config, _model in (
    (Siglip2MoEConfig, Siglip2MoEModel),
    (Siglip2MoEVisionConfig, Siglip2MoEVisionModel),
    (Siglip2MoETextConfig, Siglip2MoETextModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

# A tower loaded from a full SigLIP2-MoE directory takes its weights from under that tower's prefix.
for _name, _prefix in (("Siglip2MoEVisionModel", "vision_model"), ("Siglip2MoETextModel", "text_model")):
    register_checkpoint_conversion_mapping(_name, [PrefixChange(prefix_to_remove=_prefix)], overwrite=True)

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
