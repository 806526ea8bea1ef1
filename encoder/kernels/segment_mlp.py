"""Per-expert linear / MLP over rows sorted by expert, each one autograd node (the eager "segments" path).

Rows of expert e form one contiguous segment, so each expert is one addmm with its bias fused in: no
per-row bias gather, no [tokens, experts, hidden] tensor, no padding. Forward and backward write into
preallocated buffers segment by segment (`out=`) instead of concatenating per-expert results, and the
fused MLP keeps only the [T*k, h] pre-activation for backward: fresh multi-MB CPU buffers cost page
faults on every call and each elementwise pass over [T*k, h] is memory-bound, so this is what keeps the
MoE FFN at or below the cost of a dense FFN with the same active FLOPs (see scripts/bench_moe.py).

The segment lengths (`counts`) are Python ints, read on the host; `ops` wraps these kernels for tracing.
A `ctx` of None means no graph is recorded (inference, or a caller that runs forward directly).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .activations import FusedActivation, fused_activation


def segment_counts(ends: torch.Tensor) -> list[int]:
    """Rows per expert from the segment ends (one past each expert's last row): a host read."""
    return torch.diff(ends, prepend=ends.new_zeros(1)).tolist()


def expert_grad_buffer(weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Uninitialised [E, ...] gradient whose experts without tokens are zeroed (the rest get written whole).

    Stacked expert weights are big (tens of MB): a full zero fill would be a wasted pass over them.
    """
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if not n:
            grad[e].zero_()
    return grad


class SegmentLinear(torch.autograd.Function):
    """y[s] = x[s] @ W[e].T + b[e] for the rows s of each expert's contiguous segment."""

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
        grad_w = expert_grad_buffer(weight, ctx.counts) if need_w else None
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


def segment_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-expert linear over expert-sorted rows. x [S, in], weight [E, out, in], bias [E, out]."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return SegmentLinear.apply(x, weight, bias, counts)
    return SegmentLinear.forward(None, x, weight, bias, counts)


class SegmentMLP(torch.autograd.Function):
    """y[s] = fc2_e(act(fc1_e(x[s]))) over expert-sorted rows, one autograd node for the whole MLP.

    The only [T*k, h] tensor is the saved pre-activation, and only when a graph is recorded; the
    activation and its gradient live in per-segment buffers (reused across experts) and the activation
    is recomputed in backward, so forward and backward each touch the big activations once.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, down: torch.Tensor,
                down_bias: torch.Tensor, counts: list[int], act: FusedActivation) -> torch.Tensor:
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
        act: FusedActivation = ctx.act
        pre, post = act.pre_scale, act.post_scale
        grad_y = grad_y.contiguous()
        need_x, need_up, need_up_b, need_down, need_down_b = ctx.needs_input_grad[:5]
        grad_x = torch.empty_like(x) if need_x else None
        grad_up = expert_grad_buffer(up, ctx.counts) if need_up else None
        grad_up_b = up.new_zeros(up.shape[:2]) if need_up_b else None
        grad_down = expert_grad_buffer(down, ctx.counts) if need_down else None
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
    """Per-expert `fc2(act(fc1(x)))` over expert-sorted rows x [S, d].

    up [E, h, d], up_bias [E, h], down [E, d, h], down_bias [E, d]. Fused (`SegmentMLP`) for the
    activations `fused_activation` knows; otherwise two `segment_linear` calls around `act_fn` under
    ordinary autograd.
    """
    act = fused_activation(act_fn)
    if act is None:
        return segment_linear(act_fn(segment_linear(x, up, up_bias, counts)), down, down_bias, counts)
    tensors = (x, up, up_bias, down, down_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return SegmentMLP.apply(*tensors, counts, act)
    return SegmentMLP.forward(None, *tensors, counts, act)
