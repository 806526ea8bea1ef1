"""SigLIP2-MoE models with the interfaces of transformers' `Siglip2Model`, `Siglip2VisionModel`, `Siglip2TextModel`.

SigLIP2's towers are SigLIP's networks under other class names, except the vision input ("naflex"): each image is a
sequence of patches padded to `max_num_patches` (`pixel_values` [B, max_patches, C*p*p]), with
`pixel_attention_mask` [B, max_patches] marking the real patches and `spatial_shapes` [B, 2] their grid, to which the
position embeddings are resized. Padded patches are masked out of attention and pooling (as in transformers) and out
of the auxiliary losses (here); the rest is shared with `encoder.siglip.modeling`.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.siglip2.modeling_siglip2 import (
    Siglip2Attention,
    Siglip2MLP,
    Siglip2MultiheadAttentionPoolingHead,
    Siglip2PreTrainedModel,
    Siglip2TextEmbeddings,
    Siglip2VisionEmbeddings,
)
from transformers.utils.output_capturing import capture_outputs

from ..moe_pretrained import recorded_outputs
from ..siglip.modeling import (
    MoEHead,
    SiglipMoEBothTowers,
    SiglipMoEEncoder,
    SiglipMoEEncoderLayer,
    SiglipMoEInit,
    SiglipMoETextTower,
    SiglipMoEVisionTower,
)
from ..siglip.outputs import SiglipMoEOutputWithPooling
from ..tower_output import OUTPUT_FLAGS_DOC, tower_output
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


class Siglip2MoEAttentionPoolingHead(MoEHead, Siglip2MultiheadAttentionPoolingHead):
    """SigLIP2's attention-pooling head (masked to the real patches); its MLP is MoE when `moe_head` is True."""


class Siglip2MoEPreTrainedModel(SiglipMoEInit, Siglip2PreTrainedModel):
    config: Siglip2MoEConfig
    base_model_prefix = "siglip2_moe"
    _no_split_modules = ["Siglip2TextEmbeddings", "Siglip2VisionEmbeddings", "Siglip2MoEEncoderLayer",
                         "Siglip2MoEAttentionPoolingHead"]
    _can_record_outputs = recorded_outputs(Siglip2MoEEncoderLayer, Siglip2Attention)


class Siglip2MoEVisionModel(SiglipMoEVisionTower, Siglip2MoEPreTrainedModel):
    """The vision tower, `Siglip2VisionModel`'s interface (`SiglipMoEVisionTower` on SigLIP2's modules): padded patch
    sequences in, the attention-pooling head over the real patches."""

    config: Siglip2MoEVisionConfig
    config_class = Siglip2MoEVisionConfig
    embeddings_class = Siglip2VisionEmbeddings
    encoder_class = Siglip2MoEEncoder
    head_class = Siglip2MoEAttentionPoolingHead

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

        Padded patches are routed like any token but do not count in the auxiliary losses and, in MoE layers with a
        `capacity_factor`, take no expert capacity (attention never reads them, so the real patches are routed and
        computed as without the padding; the padded patches' MLP output is then zero).

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
                      spatial_shapes=spatial_shapes, token_mask=token_mask)
        return tower_output(self, self._features, token_mask, return_dict, inputs, flags)

    forward.__doc__ += OUTPUT_FLAGS_DOC

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                  spatial_shapes: torch.LongTensor, token_mask: torch.Tensor, **kwargs) -> SiglipMoEOutputWithPooling:
        hidden_states = self.embeddings(pixel_values, spatial_shapes)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                         attention_mask=pixel_attention_mask)
        last = self.post_layernorm(self.encoder(hidden_states, mask, token_mask=token_mask, **kwargs).last_hidden_state)
        pooled = self.head(last, pixel_attention_mask) if self.use_head else None
        return SiglipMoEOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


class Siglip2MoETextModel(SiglipMoETextTower, Siglip2MoEPreTrainedModel):
    """The SigLIP2-MoE text tower (`SiglipMoETextTower` on SigLIP2's embeddings and layers)."""

    config: Siglip2MoETextConfig
    config_class = Siglip2MoETextConfig
    embeddings_class = Siglip2TextEmbeddings
    encoder_class = Siglip2MoEEncoder


class Siglip2MoEModel(SiglipMoEBothTowers, Siglip2MoEPreTrainedModel):
    """Both towers, the logit scale and the logit bias: `Siglip2Model`'s interface plus routing outputs."""

    config: Siglip2MoEConfig
    config_class = Siglip2MoEConfig
    text_model_class = Siglip2MoETextModel
    vision_model_class = Siglip2MoEVisionModel
    output_class = Siglip2MoEOutput

    def get_image_features(self, pixel_values: torch.Tensor | None = None,
                           pixel_attention_mask: torch.Tensor | None = None,
                           spatial_shapes: torch.LongTensor | None = None, return_dict: bool | None = None,
                           **kwargs) -> SiglipMoEOutputWithPooling | tuple:
        """The vision tower's output, as transformers' `Siglip2Model.get_image_features`; `return_dict` as in
        `get_text_features`."""
        vision_inputs = dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask,
                             spatial_shapes=spatial_shapes)
        return self._image_features(return_dict, vision_inputs, kwargs)

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
        return self._full_output(vision, text, return_loss, return_dict)
