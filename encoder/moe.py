"""The MoE layer that replaces a tower's MLP (CLIP, SigLIP, ...): a token-choice top-k router over stacked experts.

Routing: router = Linear(width, E, bias=False); softmax in fp32; top-k; the k weights are renormalised to
sum to 1. With identical experts the layer therefore computes exactly the dense MLP (function
preservation), which is what sparse upcycling relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .experts import CLIPMoEExperts


def load_balance_loss(router_probs: torch.Tensor, top_k_index: torch.Tensor, num_experts: int,
                      token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard balance loss `E * sum_e f_e * P_e` over the non-padding tokens (token_mask True).

    f_e counts all k choices (fraction of tokens sending a choice to e), so uniform routing gives k.
    router_probs [T, E] (fp32), top_k_index [T, k], token_mask [T] bool or None (all tokens). Padding is
    masked out with weights, not boolean indexing, so the loss has no data-dependent shapes
    (torch.compile / torch.export trace it); no real tokens gives 0.
    """
    k = top_k_index.shape[-1]
    if token_mask is None:
        weight = router_probs.new_ones(router_probs.shape[0])
    else:
        weight = token_mask.reshape(-1).to(router_probs.dtype)
    num_tokens = weight.sum().clamp(min=1.0)
    choices = router_probs.new_zeros(num_experts).index_add_(
        0, top_k_index.reshape(-1), weight.repeat_interleave(k)
    )
    fraction_routed = choices / num_tokens
    mean_prob = (router_probs * weight[:, None]).sum(dim=0) / num_tokens
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss `mean_tokens(logsumexp(logits)^2)` over the non-padding tokens; keeps router logits small.

    router_logits [T, E]; token_mask [T] bool or None (all tokens); no real tokens gives 0.
    """
    z = torch.logsumexp(router_logits.float(), dim=-1).square()
    if token_mask is None:
        weight = torch.ones_like(z)
    else:
        weight = token_mask.reshape(-1).to(z.dtype)
    return (z * weight).sum() / weight.sum().clamp(min=1.0)


def routing_losses(router_logits: torch.Tensor, top_k: int,
                   token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balance loss, z-loss) of one MoE layer from its fp32 router logits [T, E] alone.

    The experts the layer picked are the top-k of the softmax of the logits (what `route` computes), so the
    losses need nothing but the logits a model records as `router_logits` (as transformers' MoE models
    compute their auxiliary loss). token_mask [..] bool (T entries) or None: the non-padding tokens.
    """
    probs = torch.softmax(router_logits, dim=-1)
    top_k_index = torch.topk(probs, top_k, dim=-1).indices
    mask = token_mask.reshape(-1) if token_mask is not None else None
    return load_balance_loss(probs, top_k_index, router_logits.shape[-1], mask), router_z_loss(router_logits, mask)


@dataclass
class RouterOutput:
    """What one MoE layer reports about its routing (all tokens, padding included, in `logits`)."""

    logits: torch.Tensor  # [T, E], fp32
    load_balance_loss: torch.Tensor  # scalar, non-padding tokens only
    z_loss: torch.Tensor  # scalar, non-padding tokens only


class CLIPMoERouter(nn.Linear):
    """The router: Linear(width, E, bias=False) whose output is the fp32 router logits [T, E].

    A module of its own so the models can record its output as `router_logits`, the way transformers' MoE
    models register their routers (`_can_record_outputs`); still an `nn.Linear` (same parameter name and init).
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__(hidden_size, num_experts, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states).float()


class CLIPMoESparseMLP(nn.Module):
    """Drop-in replacement of `CLIPMLP`: router + `CLIPMoEExperts`."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router_jitter = config.router_jitter
        self.router = CLIPMoERouter(config.hidden_size, config.num_experts)
        self.experts = CLIPMoEExperts(config)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [T, d] -> (logits [T, E] fp32, top-k indices [T, k], renormalised weights [T, k] fp32)."""
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            hidden_states = hidden_states * noise
        logits = self.router(hidden_states)
        probs = torch.softmax(logits, dim=-1)
        top_k_weights, top_k_index = torch.topk(probs, self.top_k, dim=-1)
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return logits, top_k_index, top_k_weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_router_logits: bool = False,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """hidden_states [B, N, d]; token_mask [B, N] (True = real token, None = all) keeps padding out of the
        auxiliary losses and, with a `capacity_factor`, out of the experts' capacity (padding then gets a zero
        MLP output and the real tokens are routed as they would be without it; see `CLIPMoEExperts.forward`).

        Returns the layer output [B, N, d] and, when `output_router_logits`, the router logits and the
        auxiliary loss terms of this layer.
        """
        batch, seq, width = hidden_states.shape
        flat = hidden_states.reshape(-1, width)
        logits, top_k_index, top_k_weights = self.route(flat)
        expert_args = (flat, top_k_index, top_k_weights.to(flat.dtype))
        if token_mask is not None and self.experts.capacity_factor is not None and self._own_experts_forward():
            out = self.experts(*expert_args, token_mask=token_mask.reshape(-1))
        else:
            out = self.experts(*expert_args)
        out = out.view(batch, seq, width)
        if not output_router_logits:
            return out, None
        balance, z = routing_losses(logits, self.top_k, token_mask)
        return out, RouterOutput(logits=logits, load_balance_loss=balance, z_loss=z)

    def _own_experts_forward(self) -> bool:
        """Whether the experts run `CLIPMoEExperts.forward` (the only implementation with a capacity, hence the only
        one taking a token mask), not one of transformers' experts functions (`grouped_mm`, ...), which are dropless
        and take (hidden_states, top_k_index, top_k_weights) alone."""
        return ALL_EXPERTS_FUNCTIONS.get(self.experts.config._experts_implementation) is None
