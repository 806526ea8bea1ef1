"""SigLIP2-MoE models with the interfaces of transformers' `Siglip2Model`, `Siglip2VisionModel`, `Siglip2TextModel`.

SigLIP2's towers are SigLIP's networks under other class names, except the vision input ("naflex"): each image is a
sequence of patches padded to `max_num_patches` (`pixel_values` [B, max_patches, C*p*p]), with
`pixel_attention_mask` [B, max_patches] marking the real patches and `spatial_shapes` [B, 2] their grid, to which the
position embeddings are resized. Padded patches are masked out of attention and pooling (as in transformers) and out
of the auxiliary losses (here); the rest is shared with `encoder.siglip.modeling`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.siglip2.modeling_siglip2 import (
    Siglip2Attention,
    Siglip2MLP,
    Siglip2MultiheadAttentionPoolingHead,
    Siglip2PreTrainedModel,
    Siglip2TextEmbeddings,
    Siglip2VisionEmbeddings,
)
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..moe import CLIPMoERouter
from ..siglip.modeling import (
    OUTPUT_FLAGS_DOC,
    HeadMoEMLP,
    SiglipMoEEncoder,
    SiglipMoEEncoderLayer,
    SiglipMoETextTower,
    init_moe_weights,
    router_kwargs,
    siglip_output,
    tower_keys_to_ignore,
)
from ..siglip.outputs import SiglipMoEOutputWithPooling
from ..tower_output import flag, install_recording_hooks, tower_output
from ..utils.errors import UserError
from .configuration import (
    Siglip2MoEConfig,
    Siglip2MoETextConfig,
    Siglip2MoEVisionConfig,
)
from .outputs import Siglip2MoEOutput


class NaflexInputError(UserError, ValueError):
    """SigLIP2 vision input without the mask or the spatial shapes of its padded patch sequences."""


class Siglip2MoEEncoderLayer(SiglipMoEEncoderLayer):
    """SigLIP2's pre-norm block (transformers' `Siglip2Attention` / `Siglip2MLP`), its MLP dense or MoE."""

    attention_class = Siglip2Attention
    dense_mlp_class = Siglip2MLP


class Siglip2MoEEncoder(SiglipMoEEncoder):
    layer_class = Siglip2MoEEncoderLayer


class Siglip2MoEAttentionPoolingHead(Siglip2MultiheadAttentionPoolingHead):
    """SigLIP2's attention-pooling head (masked to the real patches); its MLP is MoE when `moe_head` is True."""

    def __init__(self, config: Siglip2MoEVisionConfig):
        super().__init__(config)
        if config.moe_head:
            self.mlp = HeadMoEMLP(config)


class Siglip2MoEPreTrainedModel(Siglip2PreTrainedModel):
    config: Siglip2MoEConfig
    base_model_prefix = "siglip2_moe"
    _no_split_modules = ["Siglip2TextEmbeddings", "Siglip2VisionEmbeddings", "Siglip2MoEEncoderLayer",
                         "Siglip2MoEAttentionPoolingHead"]
    # As `SiglipMoEPreTrainedModel`: hidden states, attentions and each MoE router's fp32 logits.
    _can_record_outputs = {
        "hidden_states": Siglip2MoEEncoderLayer,
        "attentions": Siglip2Attention,
        "router_logits": OutputRecorder(CLIPMoERouter, index=0),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Our experts' own forward ("eager") is the fast default, as for the CLIP-MoE.
        return super().get_correct_experts_implementation(requested_experts or "eager")

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_moe_weights(module, Siglip2MoEModel)


class Siglip2MoEVisionModel(Siglip2MoEPreTrainedModel):
    """The vision tower, `Siglip2VisionModel`'s interface: padded patch sequences in, post_layernorm over every
    position, pooler_output = the attention-pooling head over the real patches (None with `vision_use_head=False`)."""

    config: Siglip2MoEVisionConfig
    config_class = Siglip2MoEVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _keys_to_ignore_on_load_unexpected = tower_keys_to_ignore("text_model")

    def __init__(self, config: Siglip2MoEVisionConfig):
        super().__init__(config)
        self.embeddings = Siglip2VisionEmbeddings(config)
        self.encoder = Siglip2MoEEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.use_head = config.vision_use_head
        if self.use_head:
            self.head = Siglip2MoEAttentionPoolingHead(config)
        self.post_init()
        install_recording_hooks(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SiglipMoEOutputWithPooling | tuple:
        """pixel_values [B, max_patches, C*p*p], pixel_attention_mask [B, max_patches] (1 = real patch),
        spatial_shapes [B, 2] (each image's patch grid) -> last_hidden_state [B, max_patches, d], pooler_output [B, d].

        Padded patches are routed like any token but do not count in the auxiliary losses.

        Raises NaflexInputError (a ValueError) when the mask or the spatial shapes are missing: without them the
        padded patches would be taken for image content."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        if pixel_attention_mask is None or spatial_shapes is None:
            missing = " and ".join(name for name, value in (("pixel_attention_mask", pixel_attention_mask),
                                                             ("spatial_shapes", spatial_shapes)) if value is None)
            raise NaflexInputError(f"SigLIP2 pixel_values came without {missing}: its images are patch sequences "
                                   "padded to max_num_patches; pass the pixel_attention_mask and spatial_shapes that "
                                   "Siglip2ImageProcessor returns with them")
        token_mask = pixel_attention_mask.to(torch.bool)
        flags = dict(kwargs, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                     output_router_logits=output_router_logits)
        inputs = dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                      spatial_shapes=spatial_shapes)
        return tower_output(self, self._features, token_mask, return_dict, inputs, flags)

    forward.__doc__ += OUTPUT_FLAGS_DOC

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                  spatial_shapes: torch.LongTensor, **kwargs) -> SiglipMoEOutputWithPooling:
        hidden_states = self.embeddings(pixel_values, spatial_shapes)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                         attention_mask=pixel_attention_mask)
        last = self.post_layernorm(self.encoder(hidden_states, mask, **kwargs).last_hidden_state)
        pooled = self.head(last, pixel_attention_mask) if self.use_head else None
        return SiglipMoEOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


class Siglip2MoETextModel(SiglipMoETextTower, Siglip2MoEPreTrainedModel):
    """The SigLIP2-MoE text tower (`SiglipMoETextTower` on SigLIP2's embeddings and layers)."""

    config: Siglip2MoETextConfig
    config_class = Siglip2MoETextConfig
    embeddings_class = Siglip2TextEmbeddings
    encoder_class = Siglip2MoEEncoder


class Siglip2MoEModel(Siglip2MoEPreTrainedModel):
    """Both towers, the logit scale and the logit bias: `Siglip2Model`'s interface plus routing outputs."""

    config: Siglip2MoEConfig
    config_class = Siglip2MoEConfig

    def __init__(self, config: Siglip2MoEConfig):
        super().__init__(config)
        self.text_model = Siglip2MoETextModel._from_config(config.text_config)
        self.vision_model = Siglip2MoEVisionModel._from_config(config.vision_config)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embeddings.token_embedding = value

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, return_dict: bool | None = None,
                          **kwargs) -> SiglipMoEOutputWithPooling | tuple:
        """The text tower's output, as transformers' `Siglip2Model.get_text_features`; `return_dict=False` (or
        `config.return_dict` False) gives `to_tuple()`."""
        out = self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              return_dict=True, **router_kwargs(self.config, kwargs))
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def get_image_features(self, pixel_values: torch.Tensor | None = None,
                           pixel_attention_mask: torch.Tensor | None = None,
                           spatial_shapes: torch.LongTensor | None = None, return_dict: bool | None = None,
                           **kwargs) -> SiglipMoEOutputWithPooling | tuple:
        """The vision tower's output, as transformers' `Siglip2Model.get_image_features`; `return_dict` as in
        `get_text_features`."""
        out = self.vision_model(pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes,
                                return_dict=True, **router_kwargs(self.config, kwargs))
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        spatial_shapes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> Siglip2MoEOutput | tuple:
        """`Siglip2Model.forward` plus routing outputs, as `SiglipMoEModel.forward`."""
        vision = self.get_image_features(pixel_values, pixel_attention_mask=pixel_attention_mask,
                                         spatial_shapes=spatial_shapes, output_router_logits=output_router_logits,
                                         return_dict=True, **kwargs)
        text = self.get_text_features(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      output_router_logits=output_router_logits, return_dict=True, **kwargs)
        return siglip_output(self, vision, text, return_loss, return_dict, Siglip2MoEOutput)
