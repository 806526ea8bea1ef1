"""The MoE encoders: model families (encoder/clip/, ...), the shared MoE layers, and transformers-compatible models.

Importing this package registers each family (`encoder.family`: clip/, siglip/, siglip2/) and its MoE configs and
models with transformers' Auto classes, so `AutoConfig` / `AutoModel.from_pretrained(DIR)` return our classes for a
saved MoE directory.
"""

# The family folders register themselves on import (encoder.family, transformers' Auto classes): imported here, so
# family_of knows every family whatever the caller imported first. A new family adds its folder to this line.
from . import clip, siglip, siglip2  # noqa: F401
from .clip import (
    CLIPMoEConfig,
    CLIPMoEModel,
    CLIPMoEPreTrainedModel,
    CLIPMoETextConfig,
    CLIPMoETextModel,
    CLIPMoEVisionConfig,
    CLIPMoEVisionModel,
    is_clip_moe_dir,
)
from .experts import EXPERT_DISPATCH, CLIPMoEExperts, register_expert_dispatch, set_expert_dispatch
from .family import family_of, is_moe_dir
from .model_card import parameter_summary
from .moe import CLIPMoESparseMLP, load_balance_loss, router_z_loss
from .outputs import CLIPMoEEncoderOutput, CLIPMoEOutput, CLIPMoEOutputWithPooling
from .save import save_clip_moe
from .tower import CLIPMoEVisionTower, LlavaVisionTower
from .utils.errors import UserError

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
    "family_of",
    "is_clip_moe_dir",
    "is_moe_dir",
    "load_balance_loss",
    "UserError",
    "parameter_summary",
    "router_z_loss",
    "save_clip_moe",
]
