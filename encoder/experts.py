"""Stacked expert MLPs and their token dispatch.

The experts follow transformers' experts interface (`up_proj` [E, h, d], `up_proj_bias` [E, h],
`down_proj` [E, d, h], `down_proj_bias` [E, d], `act_fn`), so `experts_implementation=` picks
transformers' kernels (`grouped_mm`, `batched_mm`, GPU kernels) by name. The module's own forward
(`"eager"`, our default) sorts token-choices by expert and runs one contiguous matmul per expert
segment, with the bias fused into that matmul: no per-row bias gather, no [tokens, experts, hidden]
tensor, and no padding. On CUDA it uses `torch.nn.functional.grouped_mm`, which needs no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation


class _SegmentLinear(torch.autograd.Function):
    """y[s] = x[s] @ W[e].T + b[e] for the rows s of each expert's contiguous segment.

    Written as one autograd node so forward and backward fill preallocated buffers segment by segment
    (`out=`), instead of concatenating per-expert results (an extra [T*k, h] copy each way).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(bias[e], x[start : start + n], weight[e].t(), out=out[start : start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = weight.new_zeros(weight.shape[0], weight.shape[1]) if need_b else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_out[start : start + n]
                if need_x:
                    torch.mm(g, weight[e], out=grad_x[start : start + n])
                if need_w:
                    torch.mm(g.t(), x[start : start + n], out=grad_w[e])
                if need_b:
                    torch.sum(g, dim=0, out=grad_b[e])
            start += n
        return grad_x, grad_w, grad_b, None


def segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert linear over expert-sorted rows. x [S, in], weight [E, out, in], bias [E, out]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SegmentLinear.apply(x, weight, bias, counts)
    return _SegmentLinear.forward(_NoCtx(), x, weight, bias, counts)


class _NoCtx:
    """Stands in for autograd's ctx when no graph is recorded."""

    def save_for_backward(self, *tensors):
        pass


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """Per-expert linear through `grouped_mm` (device-side offsets: no host sync). Used on CUDA."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    out = torch.nn.functional.grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
    return out + bias[expert_ids]


@use_experts_implementation(has_bias=True, has_gate=False)
class CLIPMoEExperts(nn.Module):
    """`num_experts` CLIP MLPs (fc1 -> act -> fc2) with weights stacked along dim 0."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        d, h = config.hidden_size, config.intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, h, d))
        self.up_proj_bias = nn.Parameter(torch.zeros(self.num_experts, h))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, d, h))
        self.down_proj_bias = nn.Parameter(torch.zeros(self.num_experts, d))
        self.act_fn = ACT2FN[config.hidden_act]
        self.capacity_factor = config.capacity_factor

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, d], top_k_index / top_k_weights [T, k] -> [T, d] (sum of weighted expert outputs)."""
        num_tokens, k = top_k_index.shape
        expert_of_choice = top_k_index.reshape(-1)
        # Stable sort keeps token order inside each expert segment (capacity drops the latest tokens).
        expert_sorted, order = torch.sort(expert_of_choice, stable=True)
        counts = torch.bincount(expert_of_choice, minlength=self.num_experts)
        if self.capacity_factor is not None:
            expert_sorted, order, counts = self._apply_capacity(expert_sorted, order, counts, num_tokens * k)
        token_of_choice = order // k
        x = hidden_states.index_select(0, token_of_choice)

        if x.is_cuda and hasattr(torch.nn.functional, "grouped_mm"):
            h = self.act_fn(grouped_linear(x, self.up_proj, self.up_proj_bias, expert_sorted, counts))
            y = grouped_linear(h, self.down_proj, self.down_proj_bias, expert_sorted, counts)
        else:
            host_counts = counts.tolist()
            h = self.act_fn(segment_linear(x, self.up_proj, self.up_proj_bias, host_counts))
            y = segment_linear(h, self.down_proj, self.down_proj_bias, host_counts)

        y = y * top_k_weights.reshape(-1, 1).index_select(0, order).to(y.dtype)
        out = hidden_states.new_zeros(num_tokens, hidden_states.shape[-1])
        return out.index_add_(0, token_of_choice, y.to(out.dtype))

    def _apply_capacity(self, expert_sorted, order, counts, num_choices):
        """Drop the token-choices past each expert's capacity (their tokens keep only the residual path)."""
        capacity = math.ceil(self.capacity_factor * num_choices / self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(expert_sorted.numel(), device=order.device) - starts[expert_sorted]
        keep = rank_in_expert < capacity
        return expert_sorted[keep], order[keep], counts.clamp(max=capacity)
