"""CLIP-MoE models with the interfaces of transformers' `CLIPModel`, `CLIPVisionModel` and `CLIPTextModel`.

Attention, embeddings and dense MLPs are transformers' own CLIP modules; layers listed in a tower's
`moe_layers` use `CLIPMoESparseMLP` instead. Parameter names match transformers' CLIP, so a dense CLIP
state dict loads unchanged into the non-MoE parts.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.models.clip.modeling_clip import (
    CLIPMLP,
    CLIPAttention,
    CLIPPreTrainedModel,
    CLIPTextEmbeddings,
    CLIPVisionEmbeddings,
    image_text_contrastive_loss,
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
from ..outputs import CLIPMoEOutput, CLIPMoEOutputWithPooling
from ..tower_output import MoEImageTower, MoETextTower, flag
from .configuration import CLIPMoEConfig, CLIPMoETextConfig, CLIPMoEVisionConfig


class CLIPMoEEncoderLayer(MoEEncoderLayer):
    """CLIP's pre-norm block (transformers' `CLIPAttention` / `CLIPMLP`), its MLP dense or MoE by the tower config."""

    def __init__(self, config: CLIPMoEVisionConfig | CLIPMoETextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.is_moe = layer_idx in config.moe_layers
        self.mlp = CLIPMoESparseMLP(config) if self.is_moe else CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPMoEEncoder(MoEEncoder):
    layer_class = CLIPMoEEncoderLayer


class CLIPMoEPreTrainedModel(MoEPreTrainedMixin, CLIPPreTrainedModel):
    config: CLIPMoEConfig
    base_model_prefix = "clip_moe"
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPMoEEncoderLayer", "CLIPVisionEmbeddings"]
    _can_record_outputs = recorded_outputs(CLIPMoEEncoderLayer, CLIPAttention)

    def _init_moe_weights(self, module: nn.Module) -> None:
        factor = self.config.initializer_factor
        if isinstance(module, CLIPMoEExperts):
            # up_proj as transformers' CLIPMLP inits fc1; down_proj with std hidden**-0.5 (CLIPMLP's fc2 adds a
            # (2 * num_hidden_layers)**-0.5 factor). Routers are plain Linears (default init).
            hidden = module.up_proj.shape[-1]
            init.normal_(module.up_proj, std=(2 * hidden) ** -0.5 * factor)
            init.normal_(module.down_proj, std=hidden**-0.5 * factor)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, CLIPMoEModel):
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5 * factor)
            init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5 * factor)


def _other_tower_keys(other_tower: str) -> list[str]:
    """The keys a tower loaded from a full CLIP-MoE directory (as LLaVA loads its tower) expects to leave
    out: the other tower, both projections and the logit scale."""
    return [rf"^{other_tower}\.", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$"]


class CLIPMoEVisionModel(MoEImageTower, CLIPMoEPreTrainedModel):
    """The vision tower, `CLIPVisionModel`'s interface: last_hidden_state [B, 1 + patches, d] (the CLS token first),
    pooler_output = the post-layernormed CLS."""

    config: CLIPMoEVisionConfig
    config_class = CLIPMoEVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _input_embed_layer = "patch_embedding"
    _keys_to_ignore_on_load_unexpected = _other_tower_keys("text_model")

    def __init__(self, config: CLIPMoEVisionConfig):
        super().__init__(config)
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPMoEEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                  **kwargs) -> CLIPMoEOutputWithPooling:
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        hidden_states = self.pre_layrnorm(hidden_states)
        last = self.encoder(hidden_states, **kwargs).last_hidden_state
        return CLIPMoEOutputWithPooling(last_hidden_state=last, pooler_output=self.post_layernorm(last[:, 0, :]))


class CLIPMoETextModel(MoETextTower, CLIPMoEPreTrainedModel):
    """The text tower, `CLIPTextModel`'s interface: causal attention, pooler_output [B, d] = the EOS token's (tokens
    after it are padding when no attention_mask is given)."""

    config: CLIPMoETextConfig
    config_class = CLIPMoETextConfig
    input_modalities = ("text",)
    _input_embed_layer = "token_embedding"
    _keys_to_ignore_on_load_unexpected = _other_tower_keys("vision_model")

    def __init__(self, config: CLIPMoETextConfig):
        super().__init__(config)
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPMoEEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _real_tokens(self, inputs: dict) -> torch.Tensor:
        # Without a mask the tokens after the EOS token are padding; `_features` pools at the EOS position.
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        inputs["eos_position"] = eos_position = self._eos_position(input_ids)
        if attention_mask is not None:
            return attention_mask.to(torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return positions[None, :] <= eos_position[:, None]

    @capture_outputs(tie_last_hidden_states=False)
    def _features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None, eos_position: torch.Tensor, token_mask: torch.Tensor,
                  **kwargs) -> CLIPMoEOutputWithPooling:
        hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden_states, attention_mask=attention_mask, past_key_values=None
        )
        kwargs.pop("is_causal", None)
        # token_mask: the real tokens (`_real_tokens`) take expert capacity. Attention is causal, so no real token
        # reads the padding after it, whose MLP output a capacity factor then zeroes.
        encoded = self.encoder(hidden_states, mask, token_mask=token_mask, is_causal=True, **kwargs)
        last = self.final_layer_norm(encoded.last_hidden_state)
        pooled = last[torch.arange(last.shape[0], device=last.device), eos_position.to(last.device)]
        return CLIPMoEOutputWithPooling(last_hidden_state=last, pooler_output=pooled)

    def _eos_position(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Same rule as transformers' CLIPTextModel: legacy configs (eos_token_id == 2) pool the highest token
        # id (OpenAI's end-of-text is the last vocabulary entry); others the first end-of-text token.
        ids = input_ids.to(torch.int)
        if self.config.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.config.eos_token_id).int().argmax(dim=-1)


class CLIPMoEModel(MoEFullModel, CLIPMoEPreTrainedModel):
    """Both towers and the projections: `CLIPModel`'s interface plus routing outputs."""

    config: CLIPMoEConfig
    config_class = CLIPMoEConfig

    def __init__(self, config: CLIPMoEConfig):
        super().__init__(config)
        self.projection_dim = config.projection_dim
        self.text_model = CLIPMoETextModel._from_config(config.text_config)
        self.vision_model = CLIPMoEVisionModel._from_config(config.vision_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, return_dict: bool | None = None,
                          **kwargs) -> CLIPMoEOutputWithPooling | tuple:
        """The text tower's output with `pooler_output` projected (transformers >= 5 semantics).

        As in transformers' `CLIPModel.get_text_features`, `return_dict=False` (or `config.return_dict`
        False) gives the output's `to_tuple()`: (last_hidden_state, projected pooler_output, ...).
        """
        out = self.text_model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              return_dict=True, **router_kwargs(self.config, kwargs))
        out.pooler_output = self.text_projection(out.pooler_output)
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def get_image_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                           return_dict: bool | None = None, **kwargs) -> CLIPMoEOutputWithPooling | tuple:
        """The vision tower's output with `pooler_output` projected (transformers >= 5 semantics).

        `return_dict` as in `get_text_features`.
        """
        out = self.vision_model(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                return_dict=True, **router_kwargs(self.config, kwargs))
        out.pooler_output = self.visual_projection(out.pooler_output)
        return out if flag(return_dict, self.config.return_dict) else out.to_tuple()

    def _full_output(self, vision, text, return_loss: bool | None, return_dict: bool | None) -> CLIPMoEOutput | tuple:
        """The full model's output from its towers' outputs (projected): normalised embeddings, logits =
        logit_scale.exp() * cosine similarity, the contrastive loss plus both towers' `aux_loss` when asked."""
        image_embeds = _l2_normalize(vision.pooler_output)
        text_embeds = _l2_normalize(text.pooler_output)
        logits_per_text = text_embeds @ image_embeds.t() * self.logit_scale.exp()
        return full_output(self, vision, text, (image_embeds, text_embeds), logits_per_text,
                           image_text_contrastive_loss, return_loss, return_dict, CLIPMoEOutput)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # Written as transformers' CLIP writes it, so a dense CLIP-MoE matches CLIPModel bit for bit.
    return x / x.square().sum(dim=-1, keepdim=True).pow(0.5)
