"""The CLIP-MoE model: configs, MoE layers and transformers-compatible models.

Importing this package registers the CLIP-MoE configs and models with transformers' Auto classes, so
`AutoConfig` / `AutoModel.from_pretrained(DIR)` return our classes for a saved CLIP-MoE directory.
"""

from transformers import AutoConfig, AutoModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import PrefixChange

from .configuration import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig
from .experts import EXPERT_DISPATCH, CLIPMoEExperts, register_expert_dispatch, set_expert_dispatch
from .model_card import parameter_summary
from .modeling import CLIPMoEModel, CLIPMoEPreTrainedModel, CLIPMoETextModel, CLIPMoEVisionModel
from .moe import CLIPMoESparseMLP, load_balance_loss, router_z_loss
from .outputs import CLIPMoEEncoderOutput, CLIPMoEOutput, CLIPMoEOutputWithPooling
from .save import save_clip_moe
from .tower import CLIPMoEVisionTower, LlavaVisionTower, is_clip_moe_dir
from .utils.errors import UserError

for _config, _model in (
    (CLIPMoEConfig, CLIPMoEModel),
    (CLIPMoEVisionConfig, CLIPMoEVisionModel),
    (CLIPMoETextConfig, CLIPMoETextModel),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

# A tower loaded from a full CLIP-MoE directory takes its weights from under that tower's prefix,
# as transformers does for CLIPVisionModel / CLIPTextModel.
for _name, _prefix in (("CLIPMoEVisionModel", "vision_model"), ("CLIPMoETextModel", "text_model")):
    register_checkpoint_conversion_mapping(_name, [PrefixChange(prefix_to_remove=_prefix)], overwrite=True)

__all__ = [
    "EXPERT_DISPATCH",
    "CLIPMoEConfig",
    "CLIPMoEEncoderOutput",
    "CLIPMoEExperts",
    "CLIPMoEModel",
    "CLIPMoEOutput",
    "CLIPMoEOutputWithPooling",
    "CLIPMoEPreTrainedModel",
    "register_expert_dispatch",
    "set_expert_dispatch",
    "CLIPMoESparseMLP",
    "CLIPMoETextConfig",
    "CLIPMoETextModel",
    "CLIPMoEVisionConfig",
    "CLIPMoEVisionModel",
    "CLIPMoEVisionTower",
    "LlavaVisionTower",
    "is_clip_moe_dir",
    "load_balance_loss",
    "UserError",
    "parameter_summary",
    "router_z_loss",
    "save_clip_moe",
]
