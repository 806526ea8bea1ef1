"""Stacked expert MLPs and their token dispatch.

The experts follow transformers' experts interface (`up_proj` [E, h, d], `up_proj_bias` [E, h],
`down_proj` [E, d, h], `down_proj_bias` [E, d], `act_fn`), so `experts_implementation=` picks
transformers' kernels (`grouped_mm`, `batched_mm`, GPU kernels) by name. The module's own forward
(`"eager"`, our default) sorts token-choices by expert and runs one contiguous matmul per expert
segment, with the bias fused into that matmul: no per-row bias gather, no [tokens, experts, hidden]
tensor, and no padding. On CUDA it uses `torch.nn.functional.grouped_mm`, which needs no host sync.

On the CPU path the expert MLP is one autograd node (`segment_mlp`) for CLIP's activations: QuickGELU
runs as `silu(1.702 z) / 1.702` with both scales folded into the matmuls' alpha / beta, the activation
and its gradient are computed in per-expert buffers reused across segments, and only the [T*k, h]
pre-activation is kept for backward. Fresh multi-MB CPU buffers cost page faults on every call and
each elementwise pass over [T*k, h] is memory-bound, so this is what keeps the MoE FFN at or below the
cost of a dense FFN with the same active FLOPs (see scripts/bench_moe.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.activations import (
    ACT2FN,
    GELUActivation,
    QuickGELUActivation,
    SiLUActivation,
)
from transformers.integrations.moe import use_experts_implementation

QUICK_GELU_SCALE = 1.702


class _SegmentLinear(torch.autograd.Function):
    """y[s] = x[s] @ W[e].T + b[e] for the rows s of each expert's contiguous segment.

    Written as one autograd node so forward and backward fill preallocated buffers segment by segment
    (`out=`), instead of concatenating per-expert results (an extra [T*k, h] copy each way).
    `ctx` is None when no graph is recorded.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(bias[e], x[start : start + n], weight[e].t(), out=out[start : start + n])
            start += n
        if ctx is not None:
            ctx.save_for_backward(x, weight)
            ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        grad_w = _expert_grad_buffer(weight, ctx.counts) if need_w else None
        grad_b = weight.new_zeros(weight.shape[:2]) if need_b else None
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


def _expert_grad_buffer(weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised [E, ...] gradient whose experts without tokens are zeroed (the rest get written whole).

    Stacked expert weights are big (tens of MB): a full zero fill would be a wasted pass over them.
    """
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


def segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert linear over expert-sorted rows. x [S, in], weight [E, out, in], bias [E, out]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SegmentLinear.apply(x, weight, bias, counts)
    return _SegmentLinear.forward(None, x, weight, bias, counts)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, expert_ids: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """Per-expert linear through `grouped_mm` (device-side offsets: no host sync). Used on CUDA."""
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    out = torch.nn.functional.grouped_mm(x.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)
    return out + bias[expert_ids]


@dataclass(frozen=True)
class _FusedActivation:
    """An activation given by out= kernels, with act_fn(z) == post_scale * forward(pre_scale * z).

    The scales fold into the matmuls' alpha / beta, and `forward(z, out)` / `backward(grad, z, out)` may
    write over their own input, so the fused expert MLP needs no [T*k, h] temporaries.
    """

    forward: Callable[[torch.Tensor, torch.Tensor], object]
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
    pre_scale: float = 1.0
    post_scale: float = 1.0


def _silu_forward(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu.out(z, out=out)


def _silu_backward(grad: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=out)


def _gelu_forward(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu.out(z, out=out)


def _gelu_backward(grad: torch.Tensor, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward.grad_input(grad, z, grad_input=out)


_SILU = _FusedActivation(_silu_forward, _silu_backward)
_GELU = _FusedActivation(_gelu_forward, _gelu_backward)
# z * sigmoid(1.702 z) == silu(1.702 z) / 1.702
_QUICK_GELU = _FusedActivation(_silu_forward, _silu_backward, QUICK_GELU_SCALE, 1.0 / QUICK_GELU_SCALE)


def fused_activation(act_fn: nn.Module) -> _FusedActivation | None:
    """The fused form of transformers' QuickGELU, SiLU and (exact) GELU modules; None for anything else.

    transformers' QuickGELU runs three elementwise ops with two [T*k, h] temporaries forward and about
    five backward; as a scaled SiLU it is one kernel each way.
    """
    kind = type(act_fn)
    if kind is QuickGELUActivation:
        return _QUICK_GELU
    if kind in (SiLUActivation, nn.SiLU):
        return _SILU
    if kind is GELUActivation and act_fn.act is nn.functional.gelu:
        return _GELU
    return None


class _SegmentMLP(torch.autograd.Function):
    """y[s] = fc2_e(act(fc1_e(x[s]))) over expert-sorted rows, one autograd node for the whole MLP.

    The only [T*k, h] tensor is the saved pre-activation, and only when a graph is recorded; the
    activation and its gradient live in per-segment buffers (reused across experts) and the activation
    is recomputed in backward, so forward and backward each touch the big activations once.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, counts: list[int], act: _FusedActivation) -> torch.Tensor:
        record = ctx is not None
        pre, post = act.pre_scale, act.post_scale
        y = x.new_empty(x.shape[0], down.shape[1])
        z_all = x.new_empty(x.shape[0], up.shape[1]) if record else None
        buf = x.new_empty(max(counts, default=0), up.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                z = z_all[rows] if record else buf[:n]
                torch.addmm(up_bias[e], x[rows], up[e].t(), beta=pre, alpha=pre, out=z)
                a = act.forward(z, buf[:n])
                torch.addmm(down_bias[e], a, down[e].t(), alpha=post, out=y[rows])
            start += n
        if record:
            ctx.save_for_backward(x, up, down, z_all)
            ctx.counts, ctx.act = counts, act
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, up, down, z_all = ctx.saved_tensors
        act: _FusedActivation = ctx.act
        pre, post = act.pre_scale, act.post_scale
        grad_y = grad_y.contiguous()
        need_x, need_up, need_up_b, need_down, need_down_b = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grad_up = _expert_grad_buffer(up, ctx.counts) if need_up else None
        grad_up_b = up.new_zeros(up.shape[:2]) if need_up_b else None
        grad_down = _expert_grad_buffer(down, ctx.counts) if need_down else None
        grad_down_b = down.new_zeros(down.shape[:2]) if need_down_b else None
        width = max(ctx.counts, default=0)
        grad_buf = x.new_empty(width, up.shape[1])
        act_buf = x.new_empty(width, up.shape[1]) if need_down else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n:
                continue
            rows = slice(start, start + n)
            g, z = grad_y[rows], z_all[rows]
            if need_down:
                a = act.forward(z, act_buf[:n])
                torch.addmm(grad_down[e], g.t(), a, beta=0.0, alpha=post, out=grad_down[e])
            if need_down_b:
                torch.sum(g, dim=0, out=grad_down_b[e])
            gz = grad_buf[:n]
            torch.addmm(gz, g, down[e], beta=0.0, alpha=post, out=gz)
            act.backward(gz, z, gz)
            if need_up:
                torch.addmm(grad_up[e], gz.t(), x[rows], beta=0.0, alpha=pre, out=grad_up[e])
            if need_up_b:
                torch.sum(gz, dim=0, out=grad_up_b[e]).mul_(pre)
            if need_x:
                torch.addmm(grad_x[rows], gz, up[e], beta=0.0, alpha=pre, out=grad_x[rows])
            start += n
        return grad_x, grad_up, grad_up_b, grad_down, grad_down_b, None, None


def segment_mlp(x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, counts: list[int], act_fn: nn.Module) -> torch.Tensor:
    """Per-expert `fc2(act(fc1(x)))` over expert-sorted rows x [S, d]; weights as in `CLIPMoEExperts`.

    Fused (see `_SegmentMLP`) for the activations `fused_activation` knows; otherwise two
    `segment_linear` calls around `act_fn` under ordinary autograd.
    """
    act = fused_activation(act_fn)
    if act is None:
        return segment_linear(act_fn(segment_linear(x, up, up_bias, counts)), down, down_bias, counts)
    tensors = (x, up, up_bias, down, down_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SegmentMLP.apply(*tensors, counts, act)
    return _SegmentMLP.forward(None, *tensors, counts, act)


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

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
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
            y = segment_mlp(x, self.up_proj, self.up_proj_bias, self.down_proj, self.down_proj_bias,
                            counts.tolist(), self.act_fn)

        weights = top_k_weights.reshape(-1, 1).index_select(0, order).to(y.dtype)
        y = y.mul_(weights) if not (y.requires_grad or weights.requires_grad) else y * weights
        out = hidden_states.new_zeros(num_tokens, hidden_states.shape[-1])
        return out.index_add_(0, token_of_choice, y.to(out.dtype))

    def _apply_capacity(self, expert_sorted, order, counts, num_choices):
        """Drop the token-choices past each expert's capacity (their tokens keep only the residual path)."""
        capacity = math.ceil(self.capacity_factor * num_choices / self.num_experts)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(expert_sorted.numel(), device=order.device) - starts[expert_sorted]
        keep = rank_in_expert < capacity
        return expert_sorted[keep], order[keep], counts.clamp(max=capacity)
