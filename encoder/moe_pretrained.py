"""What every family's MoE models add to transformers' own modules, written once: the pre-norm block's forward and
the layer stack, the PreTrainedModel behaviour (the experts-implementation default, the MoE weight-init hook, the
outputs `capture_outputs` records), and the full model's routing keyword arguments and output.

Family-agnostic: the CLIP, SigLIP and SigLIP2 families (encoder/clip/, encoder/siglip/, encoder/siglip2/) subclass
or mix in these with their transformers classes; each keeps its own class names, so checkpoints, `_no_split_modules`
and the Auto registrations are the family's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder

from .moe import CLIPMoERouter, CLIPMoESparseMLP
from .outputs import CLIPMoEEncoderOutput
from .tower_output import flag


def run_mlp(mlp: nn.Module, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A dense MLP's output, or a MoE layer's (whose router logits the tower records from its router).

    token_mask [B, N] (True = takes expert capacity, None = every token) reaches the MoE layer, which keeps the other
    tokens out of its experts' capacity when it has a `capacity_factor` (dropless layers compute every token)."""
    return mlp(hidden_states, token_mask)[0] if isinstance(mlp, CLIPMoESparseMLP) else mlp(hidden_states)


class MoEEncoderLayer(GradientCheckpointingLayer):
    """A pre-norm transformer block whose MLP is dense or MoE: x + attn(ln1(x)), then h + mlp(ln2(h)).

    A family's subclass builds `self_attn`, `layer_norm1`, `mlp` (its dense MLP, or `CLIPMoESparseMLP` for a layer in
    the tower config's `moe_layers`) and `layer_norm2` in the order of transformers' own layer of that family.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, **attn_kwargs) -> torch.Tensor:
        """attention_mask goes to the attention, token_mask [B, N] (see `run_mlp`) to a MoE MLP."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.layer_norm1(hidden_states), attention_mask, **attn_kwargs)
        hidden_states = residual + hidden_states
        return hidden_states + run_mlp(self.mlp, self.layer_norm2(hidden_states), token_mask)


class MoEEncoder(nn.Module):
    """The stack of `layer_class` layers. Hidden states, attentions and router logits are recorded by the tower's
    `capture_outputs` (hooks on the modules `_can_record_outputs` names), as in transformers' CLIP and SigLIP."""

    layer_class: type[MoEEncoderLayer]

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([self.layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, **kwargs) -> CLIPMoEEncoderOutput:
        """token_mask [B, N]: the tokens that take expert capacity in every MoE layer (None: all; see `run_mlp`)."""
        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, token_mask=token_mask, **kwargs)
        return CLIPMoEEncoderOutput(last_hidden_state=hidden_states)


def recorded_outputs(layer_class: type[nn.Module], attention_class: type[nn.Module]) -> dict:
    """A family's `_can_record_outputs` (transformers' convention, as in its CLIP and MoE models):
    `output_hidden_states` (True, or the indices of the states to keep) records each layer's output,
    `output_attentions` each attention's weights, `output_router_logits` each MoE router's fp32 logits in call order
    (the encoder's MoE layers, then a MoE head's)."""
    return {
        "hidden_states": layer_class,
        "attentions": attention_class,
        "router_logits": OutputRecorder(CLIPMoERouter, index=0),
    }


class MoEPreTrainedMixin:
    """Mixed in before a family's transformers `PreTrainedModel`: the experts-implementation switch, with our experts'
    own forward as the default, and `_init_moe_weights`, the family's init of what its transformers `_init_weights`
    does not know (the experts, and the full model's parameters where it inits them otherwise)."""

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Our experts' own forward ("eager") is the fast default on CPU and GPU; transformers would pick
        # its grouped_mm, which gathers biases per row.
        return super().get_correct_experts_implementation(requested_experts or "eager")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        self._init_moe_weights(module)

    def _init_moe_weights(self, module: nn.Module) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say how its experts are initialised")


class MoEFullModel:
    """The forward of a full model over fixed-size images (`CLIPModel`'s and `SiglipModel`'s interface): both towers'
    features (the family's `get_image_features` / `get_text_features`), then its `_full_output`."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ModelOutput | tuple:
        """`CLIPModel.forward` / `SiglipModel.forward` plus routing outputs.

        With `output_router_logits` (default `config.output_router_logits`) each tower output carries its
        router logits and auxiliary losses, and `aux_loss` is added to `loss` (`return_loss=True`).

        `return_dict=False` (default `config.return_dict`) gives `to_tuple()`; unlike transformers 5's
        `CLIPModel`, whose forward then fails on the tuple its own `get_image_features` returns.
        """
        vision = self.get_image_features(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                         output_router_logits=output_router_logits, return_dict=True, **kwargs)
        text = self.get_text_features(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      output_router_logits=output_router_logits, return_dict=True, **kwargs)
        return self._full_output(vision, text, return_loss, return_dict)


def router_kwargs(config, kwargs: dict) -> dict:
    """A full model's tower keyword arguments with `output_router_logits` decided: the argument for both towers;
    else True when the full model's config asks for router logits; else None (each tower's own config decides, as
    a tower used alone)."""
    wanted = kwargs.get("output_router_logits")
    if wanted is None and config.output_router_logits:
        wanted = True
    return {**kwargs, "output_router_logits": wanted}


def full_output(model: nn.Module, vision, text, embeds: tuple[torch.Tensor, torch.Tensor], logits_per_text,
                loss_fn: Callable[[torch.Tensor], torch.Tensor], return_loss: bool | None, return_dict: bool | None,
                output_class: type):
    """A full model's output from its towers' outputs, the normalised (image, text) embeddings and the logits: the
    family's contrastive loss `loss_fn(logits_per_text)` plus both towers' `aux_loss` when `return_loss`."""
    image_embeds, text_embeds = embeds
    aux_terms = [t.aux_loss for t in (vision, text) if t.aux_loss is not None]
    aux_loss = torch.stack(aux_terms).sum() if aux_terms else None
    loss = None
    if return_loss:
        loss = loss_fn(logits_per_text)
        if aux_loss is not None:
            loss = loss + aux_loss
    out = output_class(
        loss=loss,
        logits_per_image=logits_per_text.t(),
        logits_per_text=logits_per_text,
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        text_model_output=text,
        vision_model_output=vision,
        aux_loss=aux_loss,
    )
    return out if flag(return_dict, model.config.return_dict) else out.to_tuple()
