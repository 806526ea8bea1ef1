"""The MoE layer that replaces a CLIP MLP: a token-choice top-k router over stacked experts.

Routing: router = Linear(width, E, bias=False); softmax in fp32; top-k; the k weights are renormalised to
sum to 1. With identical experts the layer therefore computes exactly the dense MLP (function
preservation), which is what sparse upcycling relies on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .experts import CLIPMoEExperts


def load_balance_loss(router_probs: torch.Tensor, top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch/GShard balance loss `E * sum_e f_e * P_e` over the given (non-padding) tokens.

    f_e counts all k choices (fraction of tokens sending a choice to e), so uniform routing gives k.
    router_probs [T, E] (fp32), top_k_index [T, k].
    """
    num_tokens = router_probs.shape[0]
    if num_tokens == 0:
        return router_probs.new_zeros(())
    choices = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).to(router_probs.dtype)
    fraction_routed = choices / num_tokens
    mean_prob = router_probs.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_prob)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss `mean_tokens(logsumexp(logits)^2)`; keeps router logits small. router_logits [T, E]."""
    if router_logits.shape[0] == 0:
        return router_logits.new_zeros(())
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()


@dataclass
class RouterOutput:
    """What one MoE layer reports about its routing (all tokens, padding included, in `logits`)."""

    logits: torch.Tensor  # [T, E], fp32
    load_balance_loss: torch.Tensor  # scalar, non-padding tokens only
    z_loss: torch.Tensor  # scalar, non-padding tokens only


class CLIPMoESparseMLP(nn.Module):
    """Drop-in replacement of `CLIPMLP`: router + `CLIPMoEExperts`."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router_jitter = config.router_jitter
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = CLIPMoEExperts(config)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [T, d] -> (logits [T, E] fp32, top-k indices [T, k], renormalised weights [T, k] fp32)."""
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
            hidden_states = hidden_states * noise
        logits = self.router(hidden_states).float()
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
        """hidden_states [B, N, d]; token_mask [B, N] (True = real token) only shapes the auxiliary losses.

        Returns the layer output [B, N, d] and, when `output_router_logits`, the router logits and the
        auxiliary loss terms of this layer.
        """
        batch, seq, width = hidden_states.shape
        flat = hidden_states.reshape(-1, width)
        logits, top_k_index, top_k_weights = self.route(flat)
        out = self.experts(flat, top_k_index, top_k_weights.to(flat.dtype)).view(batch, seq, width)
        if not output_router_logits:
            return out, None
        if token_mask is not None:
            keep = token_mask.reshape(-1).to(torch.bool)
            kept_logits, kept_index = logits[keep], top_k_index[keep]
        else:
            kept_logits, kept_index = logits, top_k_index
        return out, RouterOutput(
            logits=logits,
            load_balance_loss=load_balance_loss(torch.softmax(kept_logits, dim=-1), kept_index, self.num_experts),
            z_loss=router_z_loss(kept_logits),
        )
