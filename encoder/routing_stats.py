"""The one tally of how a CLIP-MoE routes: top-k choices per expert, router entropy and token counts per MoE layer.

Every report of expert usage (`upcycle routing`, the counts recorded while lmms-eval runs, the lmms-eval
comparison table) is built from this tally, so they count the same thing the same way: exactly what the
layers pick, top-k of the fp32 softmax of the router logits (`CLIPMoESparseMLP.route`), not of the logits.
How the logits are collected (an evaluation loop, forward hooks) is up to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .utils.errors import require_finite


class RoutingTally:
    """Running counts over the MoE layers of one tower.

    Choices and tokens are integers and the entropy sum is float64, so counts over large data sets (or summed
    over processes) add up exactly. The counts live on `device` (the model's, for hooks that must not copy to
    the host at every layer) and are plain tensors, so they can be added to under `torch.inference_mode`.
    """

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int,
                 device: torch.device | str = "cpu"):
        self.moe_layers, self.num_experts, self.top_k = list(moe_layers), num_experts, top_k
        self.choices = torch.zeros(len(self.moe_layers), num_experts, dtype=torch.long, device=device)
        self.entropy = torch.zeros(len(self.moe_layers), dtype=torch.float64, device=device)
        self.tokens = torch.zeros(len(self.moe_layers), dtype=torch.long, device=device)

    def add(self, router_logits: Sequence[torch.Tensor], keep: torch.Tensor | None = None) -> None:
        """router_logits: one [T, E] tensor per MoE layer, in the order of `moe_layers`; keep [T] bool selects
        the tokens to count (e.g. the real tokens of padded captions)."""
        for slot, logits in enumerate(router_logits):
            self.add_layer(slot, logits, keep)

    def add_layer(self, slot: int, logits: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Count the [T, E] router logits of the MoE layer at position `slot` of `moe_layers`."""
        logits = logits.float() if keep is None else logits.float()[keep]
        require_finite(logits, f"router logits of MoE layer {self.moe_layers[slot]}")
        probs = logits.softmax(dim=-1)
        chosen = probs.topk(self.top_k, dim=-1).indices.reshape(-1)
        device = self.choices.device
        self.choices[slot] += torch.bincount(chosen, minlength=self.num_experts).to(device)
        self.entropy[slot] += -(probs * logits.log_softmax(dim=-1)).sum().to(device, torch.float64)
        self.tokens[slot] += logits.shape[0]

    def reduce(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the counts by `reduce_sum(counts)` (a sum over processes); every process must call it."""
        self.choices, self.entropy, self.tokens = (reduce_sum(t) for t in (self.choices, self.entropy, self.tokens))

    def add_counts(self, other: RoutingTally) -> None:
        """Add the counts of `other` (a tally of the same layers, on any device), e.g. to total several tasks."""
        device = self.choices.device
        self.choices += other.choices.to(device)
        self.entropy += other.entropy.to(device)
        self.tokens += other.tokens.to(device)

    def summary(self) -> dict:
        """{"num_experts", "top_k", "layers": [{"layer", "tokens", "choices" (top-k choices per expert),
        "expert_fraction" (the share of all choices each expert received; sums to 1, zeros before any token),
        "router_entropy" (mean per-token entropy of the router softmax, nats), "router_entropy_norm" (the same
        / log E), "usage_entropy_norm" (`usage_balance` of expert_fraction)}]}."""
        log_e = math.log(self.num_experts) if self.num_experts else 0.0
        choices, entropy, tokens = self.choices.cpu(), self.entropy.cpu(), self.tokens.cpu()
        layers = []
        for slot, layer in enumerate(self.moe_layers):
            row = choices[slot].double()
            fraction = (row / row.sum().clamp_min(1)).tolist()
            token_entropy = entropy[slot].item() / max(int(tokens[slot]), 1)
            layers.append({
                "layer": layer,
                "tokens": int(tokens[slot]),
                "choices": choices[slot].tolist(),
                "expert_fraction": fraction,
                "router_entropy": token_entropy,
                "router_entropy_norm": token_entropy / log_e if log_e else 0.0,
                "usage_entropy_norm": usage_balance(fraction),
            })
        return {"num_experts": self.num_experts, "top_k": self.top_k, "layers": layers}


def usage_balance(fractions: Sequence[float]) -> float:
    """Entropy of the expert shares divided by log(number of experts): 1 when every expert gets the same share,
    0 when one expert takes every choice (1 for a single expert, which cannot be unbalanced)."""
    if len(fractions) < 2:
        return 1.0
    entropy = -sum(f * math.log(f) for f in fractions if f > 0)
    return entropy / math.log(len(fractions))
