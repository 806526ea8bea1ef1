"""SigLIP-MoE models with the interfaces of transformers' `SiglipModel`, `SiglipVisionModel` and `SiglipTextModel`.

Attention, embeddings, dense MLPs and the attention-pooling head are transformers' own SigLIP modules; layers listed
in a tower's `moe_layers` (and the head's MLP when `moe_head`) use the family-agnostic `CLIPMoESparseMLP` instead.
Parameter names match transformers' SigLIP, so a dense SigLIP state dict loads unchanged into the non-MoE parts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.siglip.modeling_siglip import (
    SiglipAttention,
    SiglipMLP,
    SiglipMultiheadAttentionPoolingHead,
    SiglipPreTrainedModel,
    SiglipTextEmbeddings,
    SiglipVisionEmbeddings,
)
from transformers.utils.output_capturing import capture_outputs

from ..experts import CLIPMoEExperts
from ..moe import CLIPMoESparseMLP
from ..moe_pretrained import (
    MoEEncoder,
    MoEEncoderLayer,
    MoEFullModel,
    MoEPreTrainedMixin,
    full_output,
    recorded_outputs,
    router_kwargs,
)
from ..tower_output import MoEImageTower, MoETextTower, MoETower, flag
from .configuration import SiglipMoEConfig, SiglipMoETextConfig, SiglipMoEVisionConfig
from .outputs import SiglipMoEOutput, SiglipMoEOutputWithPooling


def sigmoid_loss(logits_per_text: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (transformers' `SiglipModel(return_loss=True)`, written as it writes it so the
    numbers are the same): labels +1 on the diagonal, -1 elsewhere; -sum(logsigmoid(labels * logits)) per text, mean."""
    eye = torch.eye(logits_per_text.size(0), device=logits_per_text.device)
    m1_diag1 = -torch.ones_like(logits_per_text) + 2 * eye
    loglik = nn.functional.logsigmoid(m1_diag1 * logits_per_text)
    return -torch.sum(loglik, dim=-1).mean()


class HeadMoEMLP(CLIPMoESparseMLP):
    """The shared MoE layer returning its output alone, so it stands in for the dense MLP inside transformers'
    attention-pooling heads, which call `self.mlp(x)` for a tensor. Its router logits are recorded from its router."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states)[0]


class SiglipMoEEncoderLayer(MoEEncoderLayer):
    """SigLIP's pre-norm block whose MLP is dense or MoE depending on the tower config.

    attention_class / dense_mlp_class: transformers' modules of the family (SigLIP2 sets its own).
    """

    attention_class: type[nn.Module] = SiglipAttention
    dense_mlp_class: type[nn.Module] = SiglipMLP

    def __init__(self, config: SiglipMoEVisionConfig | SiglipMoETextConfig, layer_idx: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = self.attention_class(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.is_moe = layer_idx in config.moe_layers
        self.mlp = CLIPMoESparseMLP(config) if self.is_moe else self.dense_mlp_class(config)


class SiglipMoEEncoder(MoEEncoder):
    layer_class = SiglipMoEEncoderLayer


class MoEHead:
    """Mixed in before transformers' attention-pooling (MAP) head of a family: its MLP is a MoE layer when the
    config's `moe_head` is True."""

    def __init__(self, config):
        super().__init__(config)
        if config.moe_head:
            self.mlp = HeadMoEMLP(config)


class SiglipMoEAttentionPoolingHead(MoEHead, SiglipMultiheadAttentionPoolingHead):
    """SigLIP's attention-pooling (MAP) head; its MLP is a MoE layer when the config's `moe_head` is True."""


class SiglipMoEInit(MoEPreTrainedMixin):
    """`MoEPreTrainedMixin` with SigLIP's and SigLIP2's init of what their transformers `_init_weights` does not know:
    each expert as it inits the dense MLP's fc1 / fc2 (xavier-uniform weights, biases N(0, 1e-6)), and the full
    model's logit scale and bias (zeros, as it inits `SiglipModel`'s). Routers are Linears: its Linear rule (LeCun
    normal)."""

    def _init_moe_weights(self, module: nn.Module) -> None:
        if isinstance(module, CLIPMoEExperts):
            for weight in (module.up_proj, module.down_proj):
                fan_out, fan_in = weight.shape[1:]
                bound = (6.0 / (fan_in + fan_out)) ** 0.5
                init.uniform_(weight, -bound, bound)
            init.normal_(module.up_proj_bias, std=1e-6)
            init.normal_(module.down_proj_bias, std=1e-6)
        elif isinstance(module, SiglipMoEBothTowers):
            init.zeros_(module.logit_scale)
            init.zeros_(module.logit_bias)


class SiglipMoEPreTrainedModel(SiglipMoEInit, SiglipPreTrainedModel):
    config: SiglipMoEConfig
    base_model_prefix = "siglip_moe"
    _no_split_modules = ["SiglipTextEmbeddings", "SiglipVisionEmbeddings", "SiglipMoEEncoderLayer",
                         "SiglipMoEAttentionPoolingHead"]
    _can_record_outputs = recorded_outputs(SiglipMoEEncoderLayer, SiglipAttention)


def tower_keys_to_ignore(other_tower: str) -> list[str]:
    """The keys a tower loaded from a full SigLIP-MoE directory (as LLaVA loads its tower) leaves out: the other
    tower, the logit scale and the logit bias."""
    return [rf"^{other_tower}\.", r"^logit_scale$", r"^logit_bias$"]


class SiglipMoEVisionTower(MoETower):
    """What SigLIP's and SigLIP2's vision towers share: no class token, post_layernorm over every position,
    pooler_output = the attention-pooling head's output (None with `vision_use_head=False`).

    Mixed into a family's PreTrainedModel; the family sets embeddings_class / encoder_class / head_class to its
    transformers embeddings, its MoE encoder and its MoE head, and writes `forward` / `_features` for its inputs.
    """

    embeddings_class: type[nn.Module] = SiglipVisionEmbeddings
    encoder_class: type[nn.Module] = SiglipMoEEncoder
    head_class: type[nn.Module] = SiglipMoEAttentionPoolingHead
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _keys_to_ignore_on_load_unexpected = tower_keys_to_ignore("text_model")

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = self.embeddings_class(config)
        self.encoder = self.encoder_class(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.use_head = config.vision_use_head
        if self.use_head:
            self.head = self.head_class(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding


class SiglipMoEVisionModel(MoEImageTower, SiglipMoEVisionTower, SiglipMoEPreTrainedModel):
    """The vision tower, `SiglipVisionModel`'s interface (`SiglipMoEVisionTower`): pixel_values [B, C, H, W] of a fixed
    size -> last_hidden_state [B, patches, d]."""

    config: SiglipMoEVisionConfig
    config_class = SiglipMoEVisionConfig

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                  **kwargs) -> SiglipMoEOutputWithPooling:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        last = self.post_layernorm(self.encoder(hidden_states, **kwargs).last_hidden_state)
        pooled = self.head(last) if self.use_head else None
        return SiglipMoEOutputWithPooling(last_hidden_state=last, pooler_output=pooled)


class SiglipMoETextTower(MoETextTower):
    """The text tower's body, `SiglipTextModel`'s interface: bidirectional attention, pooler_output [B,
    projection_size] = `head` of the last position (SigLIP pads to a fixed length, so that position is usually
    padding, as in transformers).

    Mixed into a family's PreTrainedModel (SigLIP's and SigLIP2's text towers are the same network); the family sets
    embeddings_class / encoder_class to its transformers embeddings and its MoE encoder.
    """

    embeddings_class: type[nn.Module] = SiglipTextEmbeddings
    encoder_class: type[nn.Module] = SiglipMoEEncoder
    input_modalities = ("text",)
    _input_embed_layer = "token_embedding"
    _keys_to_ignore_on_load_unexpected = tower_keys_to_ignore("vision_model")

    def __init__(self, config):
        super().__init__(config)
        self.embeddings = self.embeddings_class(config)
        self.encoder = self.encoder_class(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.projection_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.token_embedding

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.token_embedding = value

    def _real_tokens(self, inputs: dict) -> torch.Tensor | None:
        # Without a mask, tokens equal to `pad_token_id` are padding: SigLIP pads to 64 tokens with it and is usually
        # run without a mask.
        if inputs["attention_mask"] is not None:
            return inputs["attention_mask"].to(torch.bool)
        if self.config.pad_token_id is not None:
            return inputs["input_ids"] != self.config.pad_token_id
        return None

    def _capacity_tokens(self, inputs: dict, real_tokens: torch.Tensor | None) -> torch.Tensor | None:
        # Without an attention_mask every token attends to the padding, so all of it takes expert capacity (zeroing
        # the padding's MLP output would change the real tokens). With one, the masked tokens take none, except the
        # last position, which `_features` pools (padding, when the captions are right-padded).
        attention_mask = inputs["attention_mask"]
        if attention_mask is None:
            return None
        last = torch.arange(attention_mask.shape[-1], device=attention_mask.device) == attention_mask.shape[-1] - 1
        return attention_mask.to(torch.bool) | last

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, token_mask: torch.Tensor | None,
                  **kwargs) -> SiglipMoEOutputWithPooling:
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask)
        encoded = self.encoder(hidden_states, mask, token_mask=token_mask, **kwargs)
        last = self.final_layer_norm(encoded.last_hidden_state)
        return SiglipMoEOutputWithPooling(last_hidden_state=last, pooler_output=self.head(last[:, -1, :]))


class SiglipMoETextModel(SiglipMoETextTower, SiglipMoEPreTrainedModel):
    """The SigLIP-MoE text tower (`SiglipMoETextTower`)."""

    config: SiglipMoETextConfig
    config_class = SiglipMoETextConfig


class SiglipMoEBothTowers:
    """What SigLIP's and SigLIP2's full models share: both towers (text_model_class / vision_model_class, set by the
    family), the logit scale and the logit bias, the text features, and the output (`_full_output`).

    Mixed into a family's PreTrainedModel; the family writes `get_image_features` and `forward` for its vision inputs.
    """

    text_model_class: type[nn.Module]
    vision_model_class: type[nn.Module]
    output_class: type

    def __init__(self, config):
        super().__init__(config)
        self.text_model = self.text_model_class._from_config(config.text_config)
        self.vision_model = self.vision_model_class._from_config(config.vision_config)
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
        """The text tower's output (`pooler_output` = the text embedding before normalisation), as transformers'
        `SiglipModel.get_text_features`; `return_dict=False` (or `config.return_dict` False) gives `to_tuple()`."""
        out = self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              return_dict=True, **router_kwargs(self.config, kwargs))
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def _image_features(self, return_dict: bool | None, vision_inputs: dict, kwargs: dict):
        """The vision tower's output on `vision_inputs`, `return_dict` as in `get_text_features`."""
        out = self.vision_model(**vision_inputs, return_dict=True, **router_kwargs(self.config, kwargs))
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def _full_output(self, vision, text, return_loss: bool | None, return_dict: bool | None):
        """The full model's output (`output_class`) from its towers' outputs: normalised embeddings, logits =
        logit_scale.exp() * cosine similarity + logit_bias, the sigmoid loss plus both towers' `aux_loss` when asked.
        """
        # Written as transformers' SiglipModel writes them, so a dense SigLIP-MoE matches it bit for bit.
        image_embeds = vision.pooler_output / vision.pooler_output.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text.pooler_output / text.pooler_output.norm(p=2, dim=-1, keepdim=True)
        logits_per_text = torch.matmul(text_embeds, image_embeds.t())
        logits_per_text = logits_per_text * self.logit_scale.exp() + self.logit_bias
        return full_output(self, vision, text, (image_embeds, text_embeds), logits_per_text, sigmoid_loss,
                           return_loss, return_dict, self.output_class)


class SiglipMoEModel(MoEFullModel, SiglipMoEBothTowers, SiglipMoEPreTrainedModel):
    """Both towers, the logit scale and the logit bias: `SiglipModel`'s interface plus routing outputs; logits =
    logit_scale.exp() * cosine similarity + logit_bias, `loss` the sigmoid loss (+ `aux_loss`)."""

    config: SiglipMoEConfig
    config_class = SiglipMoEConfig
    text_model_class = SiglipMoETextModel
    vision_model_class = SiglipMoEVisionModel
    output_class = SiglipMoEOutput

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                           return_dict: bool | None = None, **kwargs) -> SiglipMoEOutputWithPooling | tuple:
        """The vision tower's output (`pooler_output` = the image embedding before normalisation); `return_dict` as
        in `get_text_features`."""
        vision_inputs = dict(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self._image_features(return_dict, vision_inputs, kwargs)
