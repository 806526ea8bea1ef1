"""Output dataclasses: CLIP's field names (so `hidden_states[select_layer]` works as in LLaVA) plus routing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput


@dataclass(init=False, repr=False, eq=False)
class RoutingOutput:
    r"""The routing fields of a CLIP-MoE encoder or tower output (all None unless `output_router_logits=True`).

    router_logits (`tuple[torch.FloatTensor]`, *optional*): one [batch * seq, num_experts] fp32 tensor per MoE
        layer (padding tokens included).
    load_balance_loss / router_z_loss (`torch.FloatTensor`, *optional*): unweighted means over the MoE layers,
        computed on non-padding tokens.
    aux_loss (`torch.FloatTensor`, *optional*): `aux_loss_coef * load_balance_loss + router_z_loss_coef *
        router_z_loss`, ready to add to a training loss.

    A dataclass that generates no methods: listed before a `ModelOutput` base, it adds these fields after
    that base's own (so `to_tuple()` keeps transformers' order and then these).
    """

    router_logits: tuple[torch.Tensor, ...] | None = None
    load_balance_loss: torch.Tensor | None = None
    router_z_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass(init=False, repr=False, eq=False)
class AuxLossOutput:
    r"""The routing field of a full MoE model's output (CLIP-MoE, SigLIP-MoE, ...), after its transformers fields.

    aux_loss (`torch.FloatTensor`, *optional*): both towers' weighted auxiliary losses, summed. With
        `return_loss=True`, `loss` = the family's contrastive loss + `aux_loss` (when router outputs were requested).

    Listed before a `ModelOutput` base, as `RoutingOutput` is.
    """

    aux_loss: torch.Tensor | None = None


@dataclass
class CLIPMoEEncoderOutput(RoutingOutput, BaseModelOutput):
    r"""`BaseModelOutput` of a MoE encoder (every family's) plus the `RoutingOutput` fields. The encoder fills
    `last_hidden_state` only: the towers record the other outputs (`_can_record_outputs`) and add the losses."""


@dataclass
class CLIPMoEOutputWithPooling(RoutingOutput, BaseModelOutputWithPooling):
    r"""`BaseModelOutputWithPooling` of a MoE tower (every family's: SigLIP's is this class too) plus the
    `RoutingOutput` fields."""


@dataclass
class CLIPMoEOutput(AuxLossOutput, CLIPOutput):
    r"""`CLIPOutput` plus `aux_loss` (`AuxLossOutput`); `loss` is the contrastive loss (+ `aux_loss`)."""
